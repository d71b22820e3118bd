# SPDX-License-Identifier: MIT
# Flags for dmoe's OWN targets (tests, examples, benchmarks). Everything here is PRIVATE: nothing
# reaches dmoe::dmoe or its consumers.
include_guard(GLOBAL)

find_package(Threads REQUIRED)

# Warning flags. Eigen comes in through the imported target Eigen3::Eigen, whose include directory
# CMake passes as -isystem, so Eigen's own warnings (e.g. -Wunused-variable in AVX PacketMath.h
# under -march=native) do not count; dmoe's headers are included with -I and must be clean.
set(DMOE_WARNING_FLAGS_GNU -Wall -Wextra -Wpedantic -Wshadow -Wconversion)
set(DMOE_WARNING_FLAGS_MSVC /W4 /permissive-)

# dmoe_target_warnings(<target>): the warning set (+ -Werror with DMOE_WERROR) on C++ sources.
function(dmoe_target_warnings target)
  target_compile_options(${target} PRIVATE
    "$<$<COMPILE_LANG_AND_ID:CXX,GNU,Clang,AppleClang>:${DMOE_WARNING_FLAGS_GNU}>"
    "$<$<COMPILE_LANG_AND_ID:CXX,MSVC>:${DMOE_WARNING_FLAGS_MSVC}>")
  if(DMOE_WERROR)
    target_compile_options(${target} PRIVATE
      "$<$<COMPILE_LANG_AND_ID:CXX,GNU,Clang,AppleClang>:-Werror>"
      "$<$<COMPILE_LANG_AND_ID:CXX,MSVC>:/WX>")
    # nvcc: see dmoe_cuda_own_target (-Werror=all-warnings).
  endif()
endfunction()

# dmoe_cuda_own_target(<target>): our own CUDA executables (tests, benchmark). Eigen 3.4 in a .cu
# TU (views and the CPU layer come with it) makes nvcc warn #20015-D (constexpr __host__ function
# called from __host__ __device__ code, no source location) and #20012-D (__host__ __device__ on
# defaulted functions in DenseStorage.h). Decision: --expt-relaxed-constexpr, which Eigen's own
# CUDA docs ask for and which removes #20015 at its cause, and -diag-suppress=20012 for the
# harmless annotation note; everything else nvcc or the host compiler says is an error under
# DMOE_WERROR (-Werror=all-warnings). The host compiler gets the warning set without -Wpedantic:
# nvcc's generated line directives trip it.
function(dmoe_cuda_own_target target)
  target_link_libraries(${target} PRIVATE dmoe::cuda Threads::Threads)
  target_compile_options(${target} PRIVATE
    "$<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr;-diag-suppress=20012>"
    "$<$<AND:$<COMPILE_LANGUAGE:CUDA>,$<CXX_COMPILER_ID:GNU,Clang>>:-Xcompiler=-Wall,-Wextra,-Wshadow,-Wconversion>"
    "$<$<COMPILE_LANG_AND_ID:CXX,GNU,Clang,AppleClang>:${DMOE_WARNING_FLAGS_GNU}>")
  if(DMOE_WERROR)
    target_compile_options(${target} PRIVATE "$<$<COMPILE_LANGUAGE:CUDA>:-Werror=all-warnings>"
      "$<$<COMPILE_LANG_AND_ID:CXX,GNU,Clang,AppleClang>:-Werror>")
  endif()
  set_target_properties(${target} PROPERTIES CUDA_STANDARD 17 CUDA_STANDARD_REQUIRED ON CUDA_EXTENSIONS OFF)
endfunction()

# dmoe_target_sanitizers(<target>): DMOE_SANITIZE (e.g. address,undefined) on compile and link.
function(dmoe_target_sanitizers target)
  if(DMOE_SANITIZE STREQUAL "")
    return()
  endif()
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    message(WARNING "dmoe: DMOE_SANITIZE is only supported with GCC and Clang; ignored")
    return()
  endif()
  set(_flags "-fsanitize=${DMOE_SANITIZE}" -fno-omit-frame-pointer -fno-sanitize-recover=all)
  target_compile_options(${target} PRIVATE "$<$<COMPILE_LANGUAGE:CXX>:${_flags}>")
  target_link_options(${target} PRIVATE ${_flags})
endfunction()

# dmoe_own_target(<target> [NO_SANITIZE]): warnings, sanitizers, link dmoe::dmoe and threads.
function(dmoe_own_target target)
  cmake_parse_arguments(PARSE_ARGV 1 arg "NO_SANITIZE" "" "")
  target_link_libraries(${target} PRIVATE dmoe::dmoe Threads::Threads)
  dmoe_target_warnings(${target})
  if(NOT arg_NO_SANITIZE)
    dmoe_target_sanitizers(${target})
  endif()
endfunction()
