import Tensors

/// MT19937, the 32-bit Mersenne Twister of Matsumoto and Nishimura (ACM TOMACS 8(1), 1998), as
/// PyTorch's CPU generator runs it (`aten/src/ATen/core/MT19937RNGEngine.h`, `at::mt19937`).
///
/// State: 624 words. Seeding (`init_genrand`): `s[0] = seed mod 2³²`,
/// `s[j] = 1812433253·(s[j−1] ⊕ (s[j−1] ≫ 30)) + j mod 2³²`. Every 624 outputs the state is
/// regenerated at once (the "twist"), and each output is a state word passed through the
/// tempering `y ⊕= y ≫ 11; y ⊕= (y ≪ 7) & 0x9d2c5680; y ⊕= (y ≪ 15) & 0xefc60000; y ⊕= y ≫ 18`.
///
/// A seed is 64 bits, as `torch.manual_seed` takes it, but only its low 32 bits reach the state:
/// `manual_seed(s)` and `manual_seed(s + 2³²)` draw the same numbers (PyTorch keeps the full
/// value only to report it back from `initial_seed()`).
///
/// This is the standard generator: seeded with 5489 its 10 000th output is 4123659995, the value
/// C++ requires of `std::mt19937` ([rand.predef]).
public struct MT19937: Sendable {
  static let stateSize = 624
  static let shift = 397
  static let matrixA: UInt32 = 0x9908_B0DF

  /// The 64-bit seed as given (PyTorch's `initial_seed()`).
  public let seed: UInt64
  private var state: [UInt32]
  /// The next state word to temper; `stateSize` means the state must be twisted first.
  private var index: Int

  /// The generator `torch.manual_seed(seed)` installs (only `seed mod 2³²` matters).
  public init(seed: UInt64) {
    self.seed = seed
    var state = [UInt32](repeating: 0, count: Self.stateSize)
    state[0] = UInt32(truncatingIfNeeded: seed)
    for j in 1..<Self.stateSize {
      let previous = state[j - 1]
      state[j] = 1_812_433_253 &* (previous ^ (previous >> 30)) &+ UInt32(j)
    }
    self.state = state
    index = Self.stateSize
  }

  /// The next 32 random bits (PyTorch's `CPUGeneratorImpl::random()`).
  public mutating func next() -> UInt32 {
    if index == Self.stateSize { twist() }
    var y = state[index]
    index += 1
    y ^= y >> 11
    y ^= (y << 7) & 0x9D2C_5680
    y ^= (y << 15) & 0xEFC6_0000
    y ^= y >> 18
    return y
  }

  /// 64 random bits from two outputs, the first in the high half (PyTorch's `random64()`).
  public mutating func next64() -> UInt64 {
    let high = UInt64(next())
    let low = UInt64(next())
    return high << 32 | low
  }

  /// Regenerates all 624 words: `s[k] = s[k + 397] ⊕ twist(upper bit of s[k], lower 31 bits of
  /// s[k + 1])`, indices mod 624, in place and in order (so words past `k` are still the old ones
  /// and words before it already the new ones, which is what the recurrence needs).
  private mutating func twist() {
    let n = Self.stateSize
    for k in 0..<n {
      let next = state[k + 1 == n ? 0 : k + 1]
      let y = (state[k] & 0x8000_0000) | (next & 0x7FFF_FFFF)
      let far = state[k + Self.shift < n ? k + Self.shift : k + Self.shift - n]
      state[k] = far ^ (y >> 1) ^ (next & 1 == 0 ? 0 : Self.matrixA)
    }
    index = 0
  }
}
