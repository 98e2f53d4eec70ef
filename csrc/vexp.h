// exp(x) for the vector policies, to ~1 ulp: x = n ln2 + r with n = round(x / ln2), |r| <= ln2 / 2, a degree-7
// Taylor polynomial for exp(r) (truncation error r^8 / 8! < 6e-9 relative), then a scale by 2^n. Each policy does
// the range reduction and the 2^n scale with its own instructions; the constants and the polynomial live here once.
#pragma once

namespace mmcl { namespace MMCL_ISA {

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693145751953125f;          // ln 2 = kLn2Hi + kLn2Lo; kLn2Hi has 15 significant bits,
constexpr float kLn2Lo = 1.42860682030941723212e-6f;  // so n * kLn2Hi is exact for |n| < 2^9
// Below kExpMin, exp(x) is under the smallest normal float: the policies without a scalef-style instruction
// return 0 there (the largest value dropped is 1.2e-38, next to sums that hold at least one term of 1).
constexpr float kExpMin = -87.33654f;
// Above kExpMax the 2^n scale would leave the normal range; every argument the kernels pass is <= ~0 (a logit
// minus a running max or an LSE), so clamping there never changes a result.
constexpr float kExpMax = 88.0f;

// exp(r) for |r| <= ln2 / 2 (Horner form of the degree-7 Taylor polynomial).
template <class V>
inline typename V::type exp_reduced(typename V::type r) {
    using T = typename V::type;
    T p = V::set1(1.0f / 5040.0f);
    p = V::fma(p, r, V::set1(1.0f / 720.0f));
    p = V::fma(p, r, V::set1(1.0f / 120.0f));
    p = V::fma(p, r, V::set1(1.0f / 24.0f));
    p = V::fma(p, r, V::set1(1.0f / 6.0f));
    p = V::fma(p, r, V::set1(0.5f));
    p = V::fma(p, r, V::set1(1.0f));
    return V::fma(p, r, V::set1(1.0f));
}

// r = x - n ln2 in two steps (Cody-Waite), exact enough for the polynomial's range.
template <class V>
inline typename V::type exp_remainder(typename V::type x, typename V::type n) {
    return V::fma(n, V::set1(-kLn2Lo), V::fma(n, V::set1(-kLn2Hi), x));
}

}  // namespace MMCL_ISA
}  // namespace mmcl
