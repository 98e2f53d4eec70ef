// Compiled with the baseline flags only: the feature checks must run on any CPU of the architecture.
#include "isa.h"

#include <stdexcept>

namespace mmcl {
namespace {

bool always() { return true; }

#if defined(MMCL_FAST_ISA_X86)
bool has_avx2() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool has_avx512() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && has_avx2();
}
#if defined(MMCL_FAST_ISA_AVX512BF16)
bool has_avx512_bf16() { return has_avx512() && __builtin_cpu_supports("avx512bf16"); }
#endif
#endif

}  // namespace

const std::vector<IsaBuild>& compiled_isas() {
    static const std::vector<IsaBuild> builds = {
#if defined(MMCL_FAST_ISA_X86)
#if defined(MMCL_FAST_ISA_AVX512BF16)
        {&avx512bf16_table, &has_avx512_bf16},
#endif
        {&avx512_table, &has_avx512},
        {&avx2_table, &has_avx2},
#endif
#if defined(MMCL_FAST_ISA_NEON)
        {&neon_table, &always},  // ASIMD is part of the aarch64 baseline
#endif
        {&scalar_table, &always},
    };
    return builds;
}

const KernelTable* select_isa(const std::string& request) {
    const auto& builds = compiled_isas();
    if (request.empty() || request == "auto") {
        for (const IsaBuild& b : builds)
            if (b.cpu_has()) return b.table;
    }
    std::string names;
    for (const IsaBuild& b : builds) {
        if (request == b.table->isa) {
            if (!b.cpu_has())
                throw std::runtime_error("MMCL_FAST_CPU_ISA='" + request + "': this CPU lacks the instructions of the " +
                                         request + " build; use 'auto' to pick the best one it has");
            return b.table;
        }
        names += std::string(names.empty() ? "" : ", ") + b.table->isa;
    }
    throw std::runtime_error("MMCL_FAST_CPU_ISA must be 'auto' or one of the builds compiled for this machine (" +
                             names + "), got '" + request + "'");
}

}  // namespace mmcl
