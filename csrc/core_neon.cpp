// The fused kernels (lse.h, sigmoid.h) built for aarch64 Advanced SIMD (compiled only for aarch64 targets).
#define MMCL_ISA neon
#include "simd_neon.h"
#include "lse.h"
#include "sigmoid.h"
#include "dispatch.h"

namespace mmcl {
const KernelTable neon_table = {neon::VecNeon::name, neon::Shape<neon::VecNeon>::NR, &neon::lse_forward<neon::VecNeon>, &neon::lse_backward<neon::VecNeon>,
        &neon::sigmoid_loss<neon::VecNeon>};
}
