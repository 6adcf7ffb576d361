import Foundation
import Tensors

/// PyTorch's default CPU generator (`CPUGeneratorImpl`): the numbers `torch.manual_seed(seed)`
/// followed by `torch.randn`, `torch.rand`, `Tensor.uniform_` and `Tensor.normal_` give on the
/// CPU in float32, bit for bit.
///
/// It is an `MT19937` plus the transforms of ATen's CPU kernels (`aten/src/ATen/native/cpu/
/// DistributionTemplates.h`, `aten/src/ATen/core/DistributionsHelper.h`,
/// `TransformationHelper.h`). Each method draws in the order PyTorch does, so a sequence of calls
/// reproduces the same sequence of PyTorch calls after `manual_seed`, `nn.Module` constructors
/// included (see `RelativePositionAttention.torchInitialized`).
///
/// - `uniform`, `rand` (`uniform_real_distribution<float>`): per element, in order, 24 bits of
///   one 32-bit draw, `u = (random() & (2²⁴ − 1))·2⁻²⁴ ∈ [0, 1)`, then `u·(high − low) + low`
///   in float.
/// - `randn`, `normal` on **16 or more** elements (`normal_fill`): first `u` as above for every
///   element; then each full block of 16 becomes 16 normals by Box–Muller, pairing element `j`
///   with `j + 8`: `r = √(−2 ln(1 − u_j))`, `θ = 2π·u_{j+8}`, `z_j = r cos θ`,
///   `z_{j+8} = r sin θ`. When the count `n` is not a multiple of 16, the last 16 elements are
///   drawn afresh (16 more draws) and transformed as a block, overwriting the partial tail and
///   the end of the previous block. Finally `fma(z, std, mean)` in float.
/// - `randn`, `normal` on **fewer than 16** elements (`normal_distribution<double>`): per element,
///   Box–Muller in double on two 53-bit uniforms `u₁, u₂` (`(random64() & (2⁵³ − 1))·2⁻⁵³`, each
///   from two 32-bit draws): `r = √(−2·log1p(−u₂))`, `θ = 2π·u₁`, returns `r cos θ` and keeps
///   `r sin θ` for the next call, whatever its size, until the generator is reseeded. Then
///   `z·std + mean` in double, rounded to float.
///
/// - `bernoulli` (`bernoulli_distribution<double>`): per element, a 53-bit uniform `u`, and 1 iff
///   `u < p`. `F.dropout` on the CPU draws its mask this way (`bernoulli_(1 − p)`), so PyTorch's
///   dropout masks are reproducible from here too; AttentionKit's `Dropout`, however, always
///   draws its masks from `Philox4x32`, whatever generated the inputs.
///
/// The ≥ 16 path computes `ln`, `sin` and `cos` in float, and PyTorch's result depends on the
/// kernel its CPU dispatch picks (`Kernel`): `.vectorized` reproduces the AVX2 and AVX-512 builds
/// (every x86-64 CPU since 2013, Colab included), `.scalar` the `default` build.
///
/// Not reproduced: CUDA generators (Philox, per device), float64 tensors' ≥ 16 path, integer
/// draws (`torch.randint`, `randperm`).
///
/// Verified against torch 2.15.0 on x86-64 Linux (glibc 2.36) by the fixtures of
/// `Scripts/fixtures/make_torch_fixtures.py`. The `.scalar` kernel calls the C library's `logf`,
/// `cosf` and `sinf`, and the < 16 path `log1p`, `cos` and `sin`: the same functions PyTorch calls
/// on Linux; another C library could round a few results differently.
public struct TorchGenerator: Sendable {
  /// Which of PyTorch's CPU kernels computes `ln`, `sin`, `cos` of the ≥ 16-element normal path,
  /// and whether `uniform` fuses its multiply-add. Both draw the same random bits.
  public enum Kernel: String, Sendable, CaseIterable {
    /// `ATEN_CPU_CAPABILITY` `avx2` or `avx512` (they share this kernel): `log256_ps` and
    /// `sincos256_ps` of `avx_mathfun.h` (Cephes polynomials in float), with the fused
    /// multiply-adds GCC forms from them; `uniform` is `fma(u, high − low, low)`.
    case vectorized
    /// `ATEN_CPU_CAPABILITY=default` (no AVX2): the C library's `logf`, `cosf`, `sinf`, with
    /// `θ = 2π·u` rounded from double; `uniform` rounds `u·(high − low)` before adding `low`.
    case scalar
  }

  /// The ≥ 16-element path's kernel.
  public let kernel: Kernel
  private var engine: MT19937
  /// The `r sin θ` kept by the < 16 path (PyTorch's `next_double_normal_sample`).
  private var cachedNormal: Double?

  /// The generator after `torch.manual_seed(seed)` (only `seed mod 2³²` reaches the state;
  /// a negative Python seed `s` is `UInt64(bitPattern: s)`).
  public init(seed: UInt64, kernel: Kernel = .vectorized) {
    self.kernel = kernel
    engine = MT19937(seed: seed)
    cachedNormal = nil
  }

  /// The seed as given (`torch.initial_seed()`).
  public var seed: UInt64 { engine.seed }

  /// The next 32 bits of the engine (`CPUGeneratorImpl::random()`).
  public mutating func random() -> UInt32 { engine.next() }

  /// Two draws as 64 bits, the first high (`CPUGeneratorImpl::random64()`).
  public mutating func random64() -> UInt64 { engine.next64() }

  // MARK: - Uniform

  /// `torch.rand(shape)`: `uniform(shape:low: 0, high: 1)`.
  public mutating func rand(shape: [Int]) throws -> Tensor {
    try uniform(shape: shape, low: 0, high: 1)
  }

  /// `torch.empty(shape).uniform_(low, high)`: one 32-bit draw per element, in row-major order,
  /// `u = (random() & (2²⁴ − 1))·2⁻²⁴`, then `u·(h − l) + l` in float with `l = Float(low)`,
  /// `h = Float(high)` (PyTorch takes the bounds as doubles and rounds them to float first).
  /// With `.vectorized` the multiply-add is one fused rounding, with `.scalar` two.
  ///
  /// Throws `AttentionError.invalidArgument` unless `low ≤ high` and `h − l` is finite (as
  /// `uniform_` checks), or for a bad shape.
  public mutating func uniform(shape: [Int], low: Double, high: Double) throws -> Tensor {
    let count = try Tensor.elementCount(of: shape)
    let (from, to) = (Float(low), Float(high))
    guard low <= high, (to - from).isFinite else {
      throw AttentionError.invalidArgument(
        "uniform needs finite low ≤ high, got low \(low), high \(high)")
    }
    let width = to - from
    var values = [Float](repeating: 0, count: count)
    for e in 0..<count {
      let u = uniformFloat()
      values[e] = kernel == .vectorized ? from.addingProduct(u, width) : u * width + from
    }
    return Tensor(validShape: shape, scalars: values)
  }

  /// `uniform_real_distribution<float>(0, 1)`: 24 random bits of one draw, `∈ [0, 1 − 2⁻²⁴]`.
  @inline(__always)
  mutating func uniformFloat() -> Float {
    Float(random() & 0xFF_FFFF) * 0x1p-24
  }

  /// `uniform_real_distribution<double>(0, 1)`: 53 random bits of `random64()`.
  @inline(__always)
  mutating func uniformDouble() -> Double {
    Double(random64() & (1 << 53 - 1)) * 0x1p-53
  }

  // MARK: - Bernoulli

  /// `torch.empty(shape).bernoulli_(probability)`, as 1 and 0: per element, in row-major order,
  /// a 53-bit uniform `u` (two 32-bit draws) and `1` iff `u < probability`
  /// (`bernoulli_distribution<double>`).
  ///
  /// This is the mask of `F.dropout(x, p, training=True)` on the CPU, which computes
  /// `x · bernoulli_(1 − p) / (1 − p)`: keep element `e` iff `u_e < 1 − p`, then multiply the
  /// kept values by `Float(1) / Float(1 − p)` (checked against torch 2.15.0 for p = 0.1, 0.25,
  /// 0.5). AttentionKit's `Dropout` does not use it: its masks come from `Philox4x32`.
  ///
  /// Throws `AttentionError.invalidArgument` unless `0 ≤ probability ≤ 1`, or for a bad shape.
  public mutating func bernoulli(shape: [Int], probability: Double) throws -> Tensor {
    let count = try Tensor.elementCount(of: shape)
    guard probability >= 0, probability <= 1 else {
      throw AttentionError.invalidArgument(
        "bernoulli needs a probability in [0, 1], got \(probability)")
    }
    var values = [Float](repeating: 0, count: count)
    for e in 0..<count where uniformDouble() < probability { values[e] = 1 }
    return Tensor(validShape: shape, scalars: values)
  }

  // MARK: - Normal

  /// `torch.randn(shape)`: `normal(shape:mean: 0, std: 1)`.
  public mutating func randn(shape: [Int]) throws -> Tensor {
    try normal(shape: shape, mean: 0, std: 1)
  }

  /// `torch.empty(shape).normal_(mean, std)` (also `nn.init.normal_`, hence `nn.Embedding`'s
  /// initial weights): the ≥ 16-element float path or the < 16-element double path described on
  /// the type, chosen by the element count as PyTorch chooses it for a contiguous float tensor.
  ///
  /// Throws `AttentionError.invalidArgument` for `std < 0` or NaN (as `normal_` checks), or for
  /// a bad shape.
  public mutating func normal(shape: [Int], mean: Double, std: Double) throws -> Tensor {
    let count = try Tensor.elementCount(of: shape)
    guard std >= 0 else {
      throw AttentionError.invalidArgument("normal needs std ≥ 0, got \(std)")
    }
    var values = [Float](repeating: 0, count: count)
    if count >= 16 {
      fillNormal(&values, mean: Float(mean), std: Float(std))
    } else {
      for e in 0..<count { values[e] = Float(nextDoubleNormal() * std + mean) }
    }
    return Tensor(validShape: shape, scalars: values)
  }

  /// `normal_fill`: uniforms for every element, Box–Muller on each full block of 16, then the
  /// last 16 redrawn and transformed when `n mod 16 ≠ 0`. `values.count ≥ 16`.
  private mutating func fillNormal(_ values: inout [Float], mean: Float, std: Float) {
    let n = values.count
    for e in 0..<n { values[e] = uniformFloat() }
    var start = 0
    while start + 16 <= n {
      boxMuller16(&values, at: start, mean: mean, std: std)
      start += 16
    }
    if n % 16 != 0 {
      for e in (n - 16)..<n { values[e] = uniformFloat() }
      boxMuller16(&values, at: n - 16, mean: mean, std: std)
    }
  }

  /// `normal_fill_16` / `normal_fill_16_AVX2`: elements `j` and `j + 8` of the block (uniforms)
  /// become `fma(r cos θ, std, mean)` and `fma(r sin θ, std, mean)`, with `r = √(−2 ln(1 − u_j))`
  /// (`1 − u ∈ [2⁻²⁴, 1]`, so the logarithm is finite) and `θ = 2π·u_{j+8}`.
  private func boxMuller16(_ values: inout [Float], at start: Int, mean: Float, std: Float) {
    for j in start..<(start + 8) {
      let u1 = 1 - values[j]
      let u2 = values[j + 8]
      let radius: Float
      let (sine, cosine): (Float, Float)
      switch kernel {
      case .vectorized:
        radius = (-2 * CephesFloat.log(u1)).squareRoot()
        (sine, cosine) = CephesFloat.sinCos(CephesFloat.twoPi * u2)
      case .scalar:
        radius = (-2 * Foundation.log(u1)).squareRoot()
        // `2.0f * c10::pi<double> * u2` is a double product, rounded to float once.
        let theta = Float(2 * Double.pi * Double(u2))
        (sine, cosine) = (Foundation.sin(theta), Foundation.cos(theta))
      }
      values[j] = mean.addingProduct(radius * cosine, std)
      values[j + 8] = mean.addingProduct(radius * sine, std)
    }
  }

  /// `normal_distribution<double>` with mean 0 and std 1: the kept `r sin θ` if there is one,
  /// else a new pair from two 53-bit uniforms (`u₁` drawn first, for the angle).
  private mutating func nextDoubleNormal() -> Double {
    if let cached = cachedNormal {
      cachedNormal = nil
      return cached
    }
    let u1 = uniformDouble()
    let u2 = uniformDouble()
    // log1p(−u₂) = ln(1 − u₂), finite since u₂ < 1.
    let radius = (-2 * Foundation.log1p(-u2)).squareRoot()
    let theta = 2 * Double.pi * u1
    cachedNormal = radius * Foundation.sin(theta)
    return radius * Foundation.cos(theta)
  }
}

// MARK: - The vectorized kernel's float math

/// `log256_ps` and `sincos256_ps` of PyTorch's `aten/src/ATen/native/cpu/avx_mathfun.h`
/// (Giovanni Garberoglio's AVX port of Julien Pommier's `sse_mathfun.h`, itself Cephes' `logf`
/// and `sinf`/`cosf`), one lane at a time, operation for operation.
///
/// PyTorch's x86 wheels are built by GCC, which contracts a multiply whose only use is an add
/// into one fused multiply-add (`-ffp-contract=fast`, its default for C++). Each such pair is
/// written here as `addingProduct`, and every other operation rounds on its own; that is what
/// makes the results equal bit for bit (checked over 81 920 normals in the fixtures' making).
/// Both functions serve only `boxMuller16`, whose arguments lie in `[2⁻²⁴, 1]` (log) and
/// `[0, 2π)` (sin, cos), so the originals' handling of zero, negative and denormal inputs is
/// left out.
enum CephesFloat {
  /// `_mm256_set1_ps(2.0f * c10::pi<double>)`: 2π rounded to float.
  static let twoPi = Float(2 * Double.pi)

  /// `ln x` for `x ∈ [2⁻²⁴, 1]`: `x = m·2ᵉ` with `m ∈ [√½, √2)`, then
  /// `ln x = (m − 1) + P(m − 1)·(m − 1)³ − (m − 1)²/2 + e·ln 2`, with `ln 2` split in two
  /// (`q₂ + q₁`, `q₂` exact in a few bits) so that `e·q₂` is exact.
  static func log(_ value: Float) -> Float {
    // Exponent and mantissa: value = x·2^(e − 1) with x ∈ [0.5, 1).
    let bits = value.bitPattern
    var e = Float(Int32(bitPattern: bits >> 23) - 0x7F) + 1
    var x = Float(bitPattern: (bits & ~0x7F80_0000) | Float(0.5).bitPattern)
    // Below √½, use 2x − 1 and e − 1 so that the polynomial's argument is in [√½ − 1, √2 − 1).
    let belowSqrtHalf = x < 0x1.6A09E6p-1  // cephes_SQRTHF = 0.707106781186547524
    let doubled: Float = belowSqrtHalf ? x : 0
    x = x - 1
    e = e - (belowSqrtHalf ? 1 : 0)
    x = x + doubled

    let z = x * x
    var y: Float = 0x1.204376p-4  // cephes_log_p0 = 7.0376836292E-2
    for coefficient in logCoefficients { y = coefficient.addingProduct(y, x) }
    y = y * x
    y = (e * logQ1).addingProduct(y, z)
    y = y - z * 0.5
    x = x + y
    x = x + e * logQ2
    return x
  }

  /// `cephes_log_p1` … `cephes_log_p8`: −1.1514610310E-1, 1.1676998740E-1, −1.2420140846E-1,
  /// 1.4249322787E-1, −1.6668057665E-1, 2.0000714765E-1, −2.4999993993E-1, 3.3333331174E-1.
  private static let logCoefficients: [Float] = [
    -0x1.D7A370p-4, 0x1.DE4A34p-4, -0x1.FCBA9Ep-4, 0x1.23D37Ep-3,
    -0x1.555CA0p-3, 0x1.999D58p-3, -0x1.FFFFF8p-3, 0x1.555554p-2,
  ]
  /// `cephes_log_q1` = −2.12194440e-4 and `cephes_log_q2` = 0.693359375 (`q₁ + q₂ ≈ ln 2`).
  private static let logQ1: Float = -0x1.BD0106p-13
  private static let logQ2: Float = 0x1.63p-1

  /// `(sin θ, cos θ)` for `θ ∈ [0, 2π)`: the octant `j = (⌊θ·4/π⌋ + 1) & ~1`, the reduced
  /// argument `x = θ − j·π/4` (π/4 in three parts, Cody–Waite), then Cephes' polynomials
  /// `sin x ≈ x + x³·S(x²)` and `cos x ≈ 1 − x²/2 + x⁴·C(x²)`, swapped and signed by the octant.
  static func sinCos(_ theta: Float) -> (sin: Float, cos: Float) {
    var x = abs(theta)
    var sinSign = theta.bitPattern & 0x8000_0000
    var j = Int32(x * 0x1.45F306p+0)  // cephes_FOPI = 4/π = 1.27323954473516, truncated
    j = (j &+ 1) & ~1
    let y = Float(j)
    let sinSwap = UInt32(bitPattern: (j & 4) << 29)
    let sinUsesSinPolynomial = j & 2 == 0
    // x − y·π/4, with −π/4 = DP1 + DP2 + DP3 (−0.78515625, −2.4187564849853515625e-4,
    // −3.77489497744594108e-8).
    x = x.addingProduct(y, -0x1.92p-1)
    x = x.addingProduct(y, -0x1.FB4p-13)
    x = x.addingProduct(y, -0x1.4442D2p-25)
    let cosSign = UInt32(bitPattern: (~(j &- 2) & 4) << 29)
    sinSign ^= sinSwap

    let z = x * x
    // coscof_p0…p2 = 2.443315711809948E-005, −1.388731625493765E-003, 4.166664568298827E-002.
    var c: Float = 0x1.99EB9Cp-16
    c = (-0x1.6C0C34p-10 as Float).addingProduct(c, z)
    c = (0x1.55554Ap-5 as Float).addingProduct(c, z)
    c = c * z
    c = (-(z * 0.5)).addingProduct(c, z)
    c = c + 1
    // sincof_p0…p2 = −1.9515295891E-4, 8.3321608736E-3, −1.6666654611E-1.
    var s: Float = -0x1.9943F2p-13
    s = (0x1.11073Cp-7 as Float).addingProduct(s, z)
    s = (-0x1.555546p-3 as Float).addingProduct(s, z)
    s = s * z
    s = x.addingProduct(s, x)

    let (sine, cosine) = sinUsesSinPolynomial ? (s, c) : (c, s)
    return (
      Float(bitPattern: sine.bitPattern ^ sinSign), Float(bitPattern: cosine.bitPattern ^ cosSign)
    )
  }
}
