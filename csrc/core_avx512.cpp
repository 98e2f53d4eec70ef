// The fused kernels (lse.h, sigmoid.h) built for AVX-512 (this file alone is compiled with -mavx512f etc.).
#define MMCL_ISA avx512
#include "simd_avx512.h"
#include "lse.h"
#include "sigmoid.h"
#include "dispatch.h"

namespace mmcl {
const KernelTable avx512_table = {avx512::VecAvx512::name, avx512::Shape<avx512::VecAvx512>::NR, &avx512::lse_forward<avx512::VecAvx512>, &avx512::lse_backward<avx512::VecAvx512>,
        &avx512::sigmoid_loss<avx512::VecAvx512>};
}
