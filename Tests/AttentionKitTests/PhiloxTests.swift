import AttentionKit
import Foundation
import Testing
import _TestSupport

/// Philox4x32-10 against Random123's known answers and numpy-generated vectors, and the uniform
/// and normal transforms of `Tensor.randomUniform` / `Tensor.randomNormal` against numpy.
@Suite("Philox4x32-10 and random tensors")
struct PhiloxTests {
  /// The Philox key as a seed: key word 0 is the low 32 bits, key word 1 the high ones.
  static func seed(_ key: [UInt32]) -> UInt64 { UInt64(key[1]) << 32 | UInt64(key[0]) }

  @Test(
    "Random123 known answers and generated vectors",
    arguments: try ReferenceFixtures.philoxVectors())
  func block(vector: PhiloxVector) throws {
    try #require(vector.counter.count == 4 && vector.key.count == 2 && vector.output.count == 4)
    let rng = Philox4x32(seed: Self.seed(vector.key))
    #expect(rng.key == (vector.key[0], vector.key[1]))
    let c = vector.counter
    let out = rng.block(c[0], c[1], c[2], c[3])
    let words = [out.0, out.1, out.2, out.3]
    #expect(
      words == vector.output,
      "counter \(c) key \(vector.key): got \(words), expected \(vector.output)")
    // The (major, minor, stream) form is the same counter: words 0–1 the 64-bit major index.
    let viaMajor = rng.block(
      major: UInt64(c[1]) << 32 | UInt64(c[0]), minor: c[2], stream: c[3])
    #expect([viaMajor.0, viaMajor.1, viaMajor.2, viaMajor.3] == vector.output)
  }

  @Test("The vectors file holds the three Random123 known answers")
  func knownAnswersPresent() throws {
    let known = try ReferenceFixtures.philoxVectors().filter { $0.source == "random123-kat" }
    #expect(known.count == 3)
    // Random123's kat_vectors, philox4x32_10, counter 0 and key 0.
    #expect(known.first?.output == [0x6627_E8D5, 0xE169_C58D, 0xBC57_AC4C, 0x9B00_DBD8])
  }

  /// `blocks16` keeps the words in 64-bit lanes and packs them at the end: every lane must still
  /// be the scalar block, including minor indices that wrap around 2³² within the sixteen.
  @Test(
    "blocks16: lane l is block(major, minorBase + l, stream)",
    arguments: [
      (0, 0, 0, 0), (42, 0xFFFF_FFFF, 0, 7), (UInt64.max, 0xFFFF_FFFF_0000_0001, 0xFFFF_FFF8, 1),
      (0x0123_4567_89AB_CDEF, 1 << 40, 0x8000_0000, 0xFFFF_FFFF),
    ] as [(UInt64, UInt64, UInt32, UInt32)])
  func blocks16(seed: UInt64, major: UInt64, minorBase: UInt32, stream: UInt32) {
    let rng = Philox4x32(seed: seed)
    let wide = rng.blocks16(major: major, minorBase: minorBase, stream: stream)
    for lane in 0..<16 {
      let scalar = rng.block(major: major, minor: minorBase &+ UInt32(lane), stream: stream)
      #expect(
        [wide.0[lane], wide.1[lane], wide.2[lane], wide.3[lane]]
          == [scalar.0, scalar.1, scalar.2, scalar.3],
        "seed \(seed) major \(major) minor \(minorBase) + \(lane) stream \(stream)")
    }
  }

  @Test(
    "randomUniform equals numpy bit for bit", arguments: try ReferenceFixtures.randomUniformCases())
  func uniform(spec: RandomCase) throws {
    let expected = try ReferenceFixtures.tensor(spec.expected)
    let observed = try Tensor.randomUniform(
      shape: [spec.count], seed: spec.seed, stream: spec.stream)
    #expect(observed.shape == [spec.count])
    var mismatches: [String] = []
    for e in 0..<spec.count where observed.scalars[e].bitPattern != expected.scalars[e].bitPattern {
      mismatches.append("[\(e)]: \(observed.scalars[e]) vs numpy \(expected.scalars[e])")
    }
    #expect(mismatches.isEmpty, "\(spec.name): \(mismatches.prefix(5))")
    #expect(observed.scalars.allSatisfy { $0 >= 0 && $0 < 1 })
  }

  /// `low + (high − low)·u` with the same `u` as the standard case.
  @Test("randomUniform maps [0, 1) onto [low, high)")
  func uniformRange() throws {
    let spec = try #require(try ReferenceFixtures.randomUniformCases().max { $0.count < $1.count })
    let u = try ReferenceFixtures.tensor(spec.expected).scalars
    let observed = try Tensor.randomUniform(
      shape: [spec.count], low: -2, high: 3, seed: spec.seed, stream: spec.stream)
    for e in 0..<spec.count {
      #expect(observed.scalars[e] == -2 + 5 * u[e], "[\(e)]: \(observed.scalars[e]), u = \(u[e])")
    }
  }

  /// numpy computes Box–Muller in float64 with its libm, the Swift code with glibc's: `log`,
  /// `cos`, `sin` may differ in the last bit of a Double, which can move the rounded Float by at
  /// most one ulp (when the Double lies next to a Float rounding boundary).
  @Test(
    "randomNormal is within 1 ulp of numpy's float64 values rounded to Float",
    arguments: try ReferenceFixtures.randomNormalCases())
  func normal(spec: RandomCase) throws {
    let expected = try ReferenceFixtures.doubles(spec.expected)
    let observed = try Tensor.randomNormal(
      shape: [spec.count], seed: spec.seed, stream: spec.stream)
    #expect(observed.shape == [spec.count])
    var worst = (ulps: UInt32(0), index: 0)
    for e in 0..<spec.count {
      let ulps = ulpDistance(observed.scalars[e], Float(expected[e]))
      if ulps > worst.ulps { worst = (ulps, e) }
    }
    #expect(
      worst.ulps <= 1,
      """
      \(spec.name): [\(worst.index)] observed \(observed.scalars[worst.index]), expected \
      \(expected[worst.index]) → \(Float(expected[worst.index])), \(worst.ulps) ulps
      """)
  }

  @Test("randomNormal applies mean and std after rounding")
  func normalMeanStd() throws {
    let spec = try #require(try ReferenceFixtures.randomNormalCases().max { $0.count < $1.count })
    let standard = try Tensor.randomNormal(
      shape: [spec.count], seed: spec.seed, stream: spec.stream)
    let shifted = try Tensor.randomNormal(
      shape: [spec.count], mean: 1.5, std: 0.25, seed: spec.seed, stream: spec.stream)
    for e in 0..<spec.count {
      #expect(shifted.scalars[e] == 1.5 + 0.25 * standard.scalars[e], "[\(e)]")
    }
  }

  @Test("Streams and seeds separate the numbers")
  func streamsDiffer() throws {
    let a = try Tensor.randomUniform(shape: [64], seed: 1, stream: RandomStream.queries)
    let b = try Tensor.randomUniform(shape: [64], seed: 1, stream: RandomStream.keys)
    let c = try Tensor.randomUniform(shape: [64], seed: 2, stream: RandomStream.queries)
    let again = try Tensor.randomUniform(shape: [64], seed: 1, stream: RandomStream.queries)
    // 24-bit uniforms: two independent draws are equal with probability 2⁻²⁴.
    #expect(zip(a.scalars, b.scalars).filter { $0 == $1 }.count <= 1)
    #expect(zip(a.scalars, c.scalars).filter { $0 == $1 }.count <= 1)
    #expect(a == again)
  }
}
