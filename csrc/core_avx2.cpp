// The fused kernels (lse.h, sigmoid.h) built for AVX2 + FMA + F16C (this file alone is compiled with -mavx2 -mfma -mf16c).
#define MMCL_ISA avx2
#include "simd_avx2.h"
#include "lse.h"
#include "sigmoid.h"
#include "dispatch.h"

namespace mmcl {
const KernelTable avx2_table = {avx2::VecAvx2::name, avx2::Shape<avx2::VecAvx2>::NR, &avx2::lse_forward<avx2::VecAvx2>, &avx2::lse_backward<avx2::VecAvx2>,
        &avx2::sigmoid_loss<avx2::VecAvx2>};
}
