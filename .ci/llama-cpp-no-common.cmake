# Included by CMake right after llama.cpp's own project() call when llama-cpp-python is built from source
# (CMAKE_ARGS="-DCMAKE_PROJECT_llama.cpp_INCLUDE=<this file>", set by .ci/run). llama-cpp-python's CMakeLists
# forces LLAMA_BUILD_COMMON=ON in the cache, which builds llama.cpp's `common` library (chat templates, argument
# parsing, downloads) and cpp-httplib: 51 of the 127 objects, none of which the Python bindings load (they load
# libllama and libggml* through ctypes). A normal variable shadows the forced cache entry in llama.cpp's
# directory scope (policy CMP0077: option() leaves it alone), so those targets are never defined.
set(LLAMA_BUILD_COMMON OFF)
