// The fused kernels (lse.h, sigmoid.h) built for AVX-512 + AVX512-BF16 + AMX: bf16 inputs run the similarity and
// both gradient GEMMs on AMX tiles (amx.h); fp32 / fp16 inputs take the AVX-512 fp32 path.
#define MMCL_ISA amxbf16
#include "simd_avx512.h"
#include "lse.h"
#include "sigmoid.h"
#include "dispatch.h"

namespace mmcl {
const KernelTable amxbf16_table = {amxbf16::VecAvx512::name, amxbf16::Shape<amxbf16::VecAvx512>::NR, &amxbf16::lse_forward<amxbf16::VecAvx512>,
                                   &amxbf16::lse_backward<amxbf16::VecAvx512>,
                                   &amxbf16::sigmoid_loss<amxbf16::VecAvx512>};
}
