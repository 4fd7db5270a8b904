# Included by CMake at llama.cpp's project() call (fogline/llama_build.py passes
# -DCMAKE_PROJECT_llama.cpp_INCLUDE_BEFORE=<this file>), i.e. after
# llama-cpp-python's top-level CMakeLists has forced LLAMA_BUILD_COMMON ON.
# The Python package never loads llama.cpp's `common` library (only libmtmd
# links it, and LLAVA_BUILD=OFF skips that); it and cpp-httplib are half of
# the build's compile time.
set(LLAMA_BUILD_COMMON OFF CACHE BOOL "llama: build common utils library (not loaded by llama-cpp-python)" FORCE)
