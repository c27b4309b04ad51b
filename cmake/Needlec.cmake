# needlec for CMake: compile a Needle model into a static library at build time.
#
#   include(path/to/needlec/cmake/Needlec.cmake)
#   needlec_add_model(assistant
#       CHECKPOINT  ${CMAKE_CURRENT_SOURCE_DIR}/model/needle.pkl
#       TOKENIZER   ${CMAKE_CURRENT_SOURCE_DIR}/model/tokenizer.model
#       TOOLS       ${CMAKE_CURRENT_SOURCE_DIR}/tools.json
#       [TARGET triple]            # default: from CMAKE_SYSTEM_NAME / CMAKE_SYSTEM_PROCESSOR
#       [WEIGHTS f32|f16|int8|int4]
#       [FOLD tools|none]
#       [MAX_GEN_LEN n] [MAX_QUERY_TOKENS n] [ESCALATE_BELOW t] [CPU level]
#       [EXTRA_ARGS args...])      # passed to `needlec build` as they are
#   target_link_libraries(app PRIVATE assistant)   # then #include "assistant.h"
#
# The function adds an imported static library target NAME whose include directory holds
# NAME.h. `needlec build` runs when the library is first needed and again whenever the
# checkpoint, tokenizer or tool list changes. needlec is found on PATH, or set
# NEEDLEC_EXECUTABLE (a cache variable) to its path.

include_guard(GLOBAL)

set(NEEDLEC_EXECUTABLE "" CACHE FILEPATH "The needlec compiler (default: found on PATH)")

# The needlec target triple for the system CMake builds for.
function(needlec_default_target out)
  string(TOLOWER "${CMAKE_SYSTEM_PROCESSOR}" cpu)
  if(cpu MATCHES "^(x86_64|amd64)$")
    set(arch x86_64)
  elseif(cpu MATCHES "^(aarch64|arm64)$")
    set(arch aarch64)
  elseif(cpu MATCHES "^riscv64")
    set(arch riscv64gc)
  else()
    message(FATAL_ERROR "needlec_add_model: no needlec target for processor '${CMAKE_SYSTEM_PROCESSOR}'; pass TARGET (see `needlec targets`)")
  endif()
  if(CMAKE_SYSTEM_NAME STREQUAL "Android")
    set(triple "${arch}-linux-android")
  elseif(CMAKE_SYSTEM_NAME STREQUAL "iOS")
    set(triple "${arch}-apple-ios")
  elseif(CMAKE_SYSTEM_NAME STREQUAL "Darwin")
    set(triple "${arch}-apple-darwin")
  elseif(CMAKE_SYSTEM_NAME STREQUAL "Windows")
    set(triple "${arch}-pc-windows-msvc")
  elseif(CMAKE_SYSTEM_NAME STREQUAL "Linux")
    set(triple "${arch}-unknown-linux-gnu")
  else()
    message(FATAL_ERROR "needlec_add_model: no needlec target for system '${CMAKE_SYSTEM_NAME}'; pass TARGET (see `needlec targets`)")
  endif()
  set(${out} "${triple}" PARENT_SCOPE)
endfunction()

function(needlec_add_model name)
  cmake_parse_arguments(PARSE_ARGV 1 NM ""
    "CHECKPOINT;TOKENIZER;TOOLS;TARGET;WEIGHTS;FOLD;MAX_GEN_LEN;MAX_QUERY_TOKENS;ESCALATE_BELOW;CPU"
    "EXTRA_ARGS")
  if(NOT name MATCHES "^[A-Za-z_][A-Za-z0-9_]*$")
    message(FATAL_ERROR "needlec_add_model: '${name}' is not a C identifier; it prefixes the library's symbols")
  endif()
  if(NM_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "needlec_add_model(${name}): unknown arguments: ${NM_UNPARSED_ARGUMENTS}")
  endif()
  foreach(required CHECKPOINT TOKENIZER TOOLS)
    if(NOT NM_${required})
      message(FATAL_ERROR "needlec_add_model(${name}): ${required} is required")
    endif()
    get_filename_component(NM_${required} "${NM_${required}}" ABSOLUTE BASE_DIR "${CMAKE_CURRENT_SOURCE_DIR}")
    if(NOT EXISTS "${NM_${required}}")
      message(FATAL_ERROR "needlec_add_model(${name}): ${required} ${NM_${required}} does not exist")
    endif()
  endforeach()

  set(exe "${NEEDLEC_EXECUTABLE}")
  if(NOT exe)
    find_program(NEEDLEC_FOUND needlec)
    if(NOT NEEDLEC_FOUND)
      message(FATAL_ERROR "needlec_add_model(${name}): needlec not found on PATH; install it or set NEEDLEC_EXECUTABLE")
    endif()
    set(exe "${NEEDLEC_FOUND}")
  endif()
  if(NOT NM_TARGET)
    needlec_default_target(NM_TARGET)
  endif()

  set(out_dir "${CMAKE_CURRENT_BINARY_DIR}/needlec/${name}")
  if(NM_TARGET MATCHES "windows-msvc$")
    set(lib "${out_dir}/${name}.lib")
  else()
    set(lib "${out_dir}/lib${name}.a")
  endif()
  set(args build --checkpoint "${NM_CHECKPOINT}" --tokenizer "${NM_TOKENIZER}" --tools "${NM_TOOLS}"
    --target "${NM_TARGET}" --name "${name}" --out-dir "${out_dir}")
  foreach(opt WEIGHTS FOLD MAX_GEN_LEN MAX_QUERY_TOKENS ESCALATE_BELOW CPU)
    if(DEFINED NM_${opt} AND NOT NM_${opt} STREQUAL "")
      string(TOLOWER "${opt}" flag)
      string(REPLACE "_" "-" flag "${flag}")
      list(APPEND args "--${flag}" "${NM_${opt}}")
    endif()
  endforeach()
  list(APPEND args ${NM_EXTRA_ARGS})

  file(MAKE_DIRECTORY "${out_dir}")
  add_custom_command(
    OUTPUT "${lib}" "${out_dir}/${name}.h"
    COMMAND "${exe}" ${args}
    DEPENDS "${NM_CHECKPOINT}" "${NM_TOKENIZER}" "${NM_TOOLS}"
    COMMENT "needlec: compiling ${name} for ${NM_TARGET}"
    VERBATIM)
  add_custom_target(${name}_needlec DEPENDS "${lib}" "${out_dir}/${name}.h")
  add_library(${name} STATIC IMPORTED GLOBAL)
  set_target_properties(${name} PROPERTIES
    IMPORTED_LOCATION "${lib}"
    INTERFACE_INCLUDE_DIRECTORIES "${out_dir}")
  add_dependencies(${name} ${name}_needlec)
endfunction()
