# SPDX-License-Identifier: MIT
# The Eigen version gate (cmake/dmoeEigenVersion.cmake) accepts 3.4.x only and refuses the rest
# with a message that names the version found and the versions that work.
# Usage: cmake -DMODULE=<path to dmoeEigenVersion.cmake> -P check_eigen_version.cmake
include("${MODULE}")
set(failures "")
foreach(v 3.4.0 3.4.1 3.4.90)
  dmoe_eigen_version_check("${v}" ok msg)
  if(NOT ok)
    string(APPEND failures "  ${v} refused, must be accepted\n")
  endif()
endforeach()
foreach(v 3.3.9 3.3.90 3.5.0 5.0.0 5.0.1 "")
  dmoe_eigen_version_check("${v}" ok msg)
  if(ok)
    string(APPEND failures "  '${v}' accepted, must be refused\n")
  elseif(NOT msg MATCHES "needs Eigen 3\\.4\\.x" OR NOT msg MATCHES "found Eigen ${v}\\.")
    string(APPEND failures "  '${v}': message does not name the versions that work and the one found: ${msg}\n")
  endif()
endforeach()
if(failures)
  message(FATAL_ERROR "Eigen version gate:\n${failures}")
endif()
message(STATUS "Eigen version gate: 3.4.x accepted, 3.3, 3.5 and 5.x refused with a message")
