// The ISA builds compiled into this binary, best first, and the choice among them by CPU feature detection.
// Shared by the Python bindings and the standalone C++ tests, so both pick (and refuse) ISAs the same way.
#pragma once
#include <string>
#include <vector>

#include "dispatch.h"

namespace mmcl {

struct IsaBuild {
    const KernelTable* table;
    bool (*cpu_has)();  // does this CPU run the build? (checked before any of its code executes)
};

// Every build compiled for this architecture, best first; the portable "scalar" build is always last.
const std::vector<IsaBuild>& compiled_isas();

// "auto" (or "") -> the best build this CPU runs; a build's name -> that build. Throws std::runtime_error naming
// the request and the alternatives when the name is unknown here or the CPU lacks the instructions.
const KernelTable* select_isa(const std::string& request);

}  // namespace mmcl
