# SPDX-License-Identifier: MIT
# The Eigen versions dmoe builds with, for the build (CMakeLists.txt) and for consumers
# (dmoeConfig.cmake). Only Eigen 3.4.x: cpu/gemm.hpp drives Eigen 3.4's internal GEMM API
# (general_matrix_matrix_product with caller-owned packing panels) and static_asserts that
# version; Eigen 3.3 lacks parts of the API dmoe uses, Eigen 5 changed the internal one.
# Eigen is found unversioned and checked here, so that a wrong version gets this message instead
# of a compile error deep in gemm.hpp.

# dmoe_eigen_version_check(<version> <out_ok> <out_message>)
function(dmoe_eigen_version_check version out_ok out_message)
  if(version VERSION_GREATER_EQUAL 3.4 AND version VERSION_LESS 3.5)
    set(${out_ok} TRUE PARENT_SCOPE)
    set(${out_message} "" PARENT_SCOPE)
  else()
    set(${out_ok} FALSE PARENT_SCOPE)
    set(${out_message}
        "dmoe needs Eigen 3.4.x (3.4.0 or a later 3.4 release); found Eigen ${version}. cpu/gemm.hpp uses Eigen 3.4's internal GEMM API, which Eigen 3.3 lacks and Eigen 5 changed. Point Eigen3_DIR (or CMAKE_PREFIX_PATH) at an Eigen 3.4 installation."
        PARENT_SCOPE)
  endif()
endfunction()
