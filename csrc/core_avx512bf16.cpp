// The fused kernels (lse.h, sigmoid.h) built for AVX-512 with AVX512-BF16: bf16 inputs take the vdpbf16ps similarity GEMM.
#define MMCL_ISA avx512bf16
#include "simd_avx512.h"
#include "lse.h"
#include "sigmoid.h"
#include "dispatch.h"

namespace mmcl {
const KernelTable avx512bf16_table = {avx512bf16::VecAvx512::name, avx512bf16::Shape<avx512bf16::VecAvx512>::NR, &avx512bf16::lse_forward<avx512bf16::VecAvx512>,
                                      &avx512bf16::lse_backward<avx512bf16::VecAvx512>,
        &avx512bf16::sigmoid_loss<avx512bf16::VecAvx512>};
}
