# SPDX-License-Identifier: MIT
# cmake -DBUILD_DIR=<dmoe build> -DPREFIX=<fresh prefix> [-DCONFIG=<cfg>] -P install.cmake
# Installs dmoe into an emptied prefix (fixture of the find_package consumer tests).
foreach(_v BUILD_DIR PREFIX)
  if(NOT DEFINED ${_v})
    message(FATAL_ERROR "install.cmake: ${_v} not given")
  endif()
endforeach()
file(REMOVE_RECURSE "${PREFIX}")
set(_config "")
if(CONFIG)
  set(_config --config "${CONFIG}")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${PREFIX}" ${_config}
  RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "cmake --install ${BUILD_DIR} --prefix ${PREFIX} failed (${_rc})")
endif()
foreach(_f include/dmoe/dmoe.hpp include/dmoe/version.hpp)
  if(NOT EXISTS "${PREFIX}/${_f}")
    message(FATAL_ERROR "install.cmake: ${PREFIX}/${_f} was not installed")
  endif()
endforeach()
