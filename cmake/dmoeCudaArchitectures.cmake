# SPDX-License-Identifier: MIT
# Default CUDA architectures for dmoe's OWN build (top-level only; never for consumers, who keep
# CMAKE_CUDA_ARCHITECTURES / CUDAARCHS to themselves). "native" fails on a machine without a GPU,
# so a build-only host (CI) compiles for fixed architectures: 80 (A100) and 90 (H100/H200), the
# GPUs of docs/performance.md. The CUDA backend needs sm_80+ (bf16 and TF32 tensor cores).
set(DMOE_CUDA_FALLBACK_ARCHITECTURES "80;90" CACHE STRING
  "CUDA architectures for dmoe's own build when no GPU is visible")
mark_as_advanced(DMOE_CUDA_FALLBACK_ARCHITECTURES)

function(dmoe_default_cuda_architectures out_var)
  set(_archs "${DMOE_CUDA_FALLBACK_ARCHITECTURES}")
  find_program(DMOE_NVIDIA_SMI nvidia-smi)
  mark_as_advanced(DMOE_NVIDIA_SMI)
  if(DMOE_NVIDIA_SMI AND CMAKE_VERSION VERSION_GREATER_EQUAL 3.24)
    execute_process(COMMAND "${DMOE_NVIDIA_SMI}" -L
      RESULT_VARIABLE _rc OUTPUT_VARIABLE _gpus ERROR_QUIET TIMEOUT 20)
    if(_rc EQUAL 0 AND _gpus MATCHES "GPU [0-9]+:")
      set(_archs native)
    endif()
  endif()
  message(STATUS "dmoe: CMAKE_CUDA_ARCHITECTURES not set; using ${_archs} for dmoe's own targets")
  set(${out_var} "${_archs}" PARENT_SCOPE)
endfunction()
