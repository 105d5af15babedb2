"""Moved to gptjax.bench.peers.hf (the Hugging Face peer, one of the peers); this name stays for one release."""

from gptjax.bench.peers.hf import describe, hf_generate, hf_model, peer_device, peer_job, require_peer  # noqa: F401
