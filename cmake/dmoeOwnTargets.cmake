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
    # Not yet for nvcc: Eigen 3.4 in a .cu TU emits warning #20015-D (constexpr __host__ called
    # from __host__ __device__) without a source location; decide (-Werror=all-warnings plus
    # --expt-relaxed-constexpr or -diag-suppress=20015) once dmoe has CUDA code.
  endif()
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
