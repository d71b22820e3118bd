# SPDX-License-Identifier: MIT
# CTest docs.conversion_tables: runs example 04 (full, ~5 s) with --markdown and fails unless
# docs/conversion.md holds exactly the block it writes, so the doc's tables cannot go stale.
# Regenerate: build/release/examples/04_convert_minilm --markdown FILE, paste FILE between the markers.
execute_process(COMMAND "${EXE}" --csv "${OUT}/csv" --markdown "${OUT}/conversion_tables.md"
                RESULT_VARIABLE rc OUTPUT_QUIET)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "04_convert_minilm --markdown failed (exit ${rc})")
endif()
file(READ "${OUT}/conversion_tables.md" want)
file(READ "${DOC}" doc)
string(FIND "${doc}" "${want}" at)
if(at EQUAL -1)
  message(FATAL_ERROR "${DOC}: the held-out tables differ from what 04_convert_minilm --markdown writes "
                      "(${OUT}/conversion_tables.md); paste that file's content between the markers")
endif()
