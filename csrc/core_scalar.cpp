// The fused kernels (lse.h, sigmoid.h) built for the baseline ISA: the portable fallback, also run by the tests.
#define MMCL_ISA scalar
#include "simd_scalar.h"
#include "lse.h"
#include "sigmoid.h"
#include "dispatch.h"

namespace mmcl {
const KernelTable scalar_table = {scalar::VecScalar::name, scalar::Shape<scalar::VecScalar>::NR, &scalar::lse_forward<scalar::VecScalar>, &scalar::lse_backward<scalar::VecScalar>,
        &scalar::sigmoid_loss<scalar::VecScalar>};
}
