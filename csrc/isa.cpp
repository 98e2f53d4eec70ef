// Compiled with the baseline flags only: the feature checks must run on any CPU of the architecture.
#include "isa.h"

#include <stdexcept>

#if defined(MMCL_FAST_ISA_AMX)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

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
#if defined(MMCL_FAST_ISA_AMX)
// AMX-TILE and AMX-BF16 (CPUID leaf 7: EDX bits 24 and 22), and Linux's permission for this process to use the
// tile data state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 18; without it the first tile instruction
// faults). Asked once; a kernel that refuses (or predates AMX) leaves the avx512-bf16 build in charge.
bool has_amx_bf16() {
    static const bool ok = [] {
        if (!has_avx512_bf16()) return false;
        unsigned a = 0, b = 0, c = 0, d = 0;
        if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
        if (!((d >> 24) & 1u) || !((d >> 22) & 1u)) return false;
        constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
        return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
    }();
    return ok;
}
#endif
#endif

}  // namespace

const std::vector<IsaBuild>& compiled_isas() {
    static const std::vector<IsaBuild> builds = {
#if defined(MMCL_FAST_ISA_X86)
#if defined(MMCL_FAST_ISA_AMX)
        {&amxbf16_table, &has_amx_bf16},
#endif
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
