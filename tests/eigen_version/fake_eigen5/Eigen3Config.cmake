# SPDX-License-Identifier: MIT
# A stand-in Eigen 5 package (no headers): configuring dmoe against it must stop at the version
# gate with its message (CTest cmake.eigen_version_refused).
set(Eigen3_VERSION 5.0.0)
set(EIGEN3_VERSION_STRING 5.0.0)
if(NOT TARGET Eigen3::Eigen)
  add_library(Eigen3::Eigen INTERFACE IMPORTED)
endif()
