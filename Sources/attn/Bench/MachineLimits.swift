import Dispatch
import Foundation

/// The two limits a benchmark's figures are held against, measured in the same run with the same
/// threads: the FMA peak (`FMAPeak`: independent fused multiply-adds on every thread at once, two
/// flops each) and the memory read bandwidth (`BandwidthProbe`: a streaming sum over a buffer
/// far larger than the caches). `attn bench` measures them before each case and after the last
/// and holds every case against the highest of each (`raised(to:)`): a limit is the best the machine showed, and a measurement
/// taken while this machine's two vCPUs shared one core reads half the FMA peak.
struct MachineLimits: Encodable {
  /// Floating-point operations per second at the FMA peak, in billions.
  var peakGflops: Double
  /// Bytes per second read from memory, in billions.
  var bandwidthGBPerSecond: Double
  var threads: Int

  static func measure(threads: Int) -> MachineLimits {
    MachineLimits(
      peakGflops: FMAPeak.run(threads: threads),
      bandwidthGBPerSecond: BandwidthProbe.run(threads: threads), threads: threads)
  }

  /// Each limit the higher of `self`'s and `other`'s.
  func raised(to other: MachineLimits) -> MachineLimits {
    MachineLimits(
      peakGflops: max(peakGflops, other.peakGflops),
      bandwidthGBPerSecond: max(bandwidthGBPerSecond, other.bandwidthGBPerSecond),
      threads: threads)
  }

  var line: String {
    String(
      format: "limits (%d threads): FMA peak %.1f GFLOP/s, memory read %.1f GB/s", threads,
      peakGflops, bandwidthGBPerSecond)
  }
}

/// The FMA peak: on each of `threads` threads, twelve independent sixteen-lane chains of
/// `a = a + a·m` (one fused multiply-add each, latency hidden by the chains), timed for about
/// 50 ms after a calibration; the best of three. `CoreProbe` times a loop of multiply-adds and
/// subtractions, half the FMA rate: it compares threads, this measures the limit.
enum FMAPeak {
  /// Billions of floating-point operations per second on `threads` threads together.
  static func run(threads: Int, seconds: Double = 0.05) -> Double {
    var iterations = 1 << 14
    while Stopwatch.time({ CoreProbe.blackHole(kernel(iterations)) }) < seconds / 4,
      iterations < 1 << 30
    {
      iterations *= 4
    }
    let (workers, count) = (max(threads, 1), iterations)
    var best = 0.0
    for _ in 0..<3 {
      let elapsed = Stopwatch.time {
        DispatchQueue.concurrentPerform(iterations: workers) { _ in
          CoreProbe.blackHole(kernel(count))
        }
      }
      best = max(best, Double(workers * count * 12 * 16 * 2) / elapsed * 1e-9)
    }
    return best
  }

  /// Twelve chains of `a = a + a·m`: the values overflow to infinity within a few hundred
  /// iterations and stay there, which costs an FMA unit nothing (no subnormals, no NaN).
  @inline(never)
  private static func kernel(_ iterations: Int) -> Float {
    let m = SIMD16<Float>(repeating: 0.999_999)
    var a = (
      SIMD16<Float>(repeating: 1), SIMD16<Float>(repeating: 2), SIMD16<Float>(repeating: 3),
      SIMD16<Float>(repeating: 4), SIMD16<Float>(repeating: 5), SIMD16<Float>(repeating: 6),
      SIMD16<Float>(repeating: 7), SIMD16<Float>(repeating: 8), SIMD16<Float>(repeating: 9),
      SIMD16<Float>(repeating: 10), SIMD16<Float>(repeating: 11), SIMD16<Float>(repeating: 12)
    )
    for _ in 0..<iterations {
      a.0 = a.0.addingProduct(a.0, m)
      a.1 = a.1.addingProduct(a.1, m)
      a.2 = a.2.addingProduct(a.2, m)
      a.3 = a.3.addingProduct(a.3, m)
      a.4 = a.4.addingProduct(a.4, m)
      a.5 = a.5.addingProduct(a.5, m)
      a.6 = a.6.addingProduct(a.6, m)
      a.7 = a.7.addingProduct(a.7, m)
      a.8 = a.8.addingProduct(a.8, m)
      a.9 = a.9.addingProduct(a.9, m)
      a.10 = a.10.addingProduct(a.10, m)
      a.11 = a.11.addingProduct(a.11, m)
    }
    let sum = a.0 + a.1 + a.2 + a.3 + a.4 + a.5 + a.6 + a.7 + a.8 + a.9 + a.10 + a.11
    return sum.sum()
  }
}

/// The memory read bandwidth: `threads` threads each summing their share of a 256 MiB buffer
/// (8× a large last-level cache) with sixteen-lane vector adds, the best of two passes after
/// one that touches every page. The sum is kept, so no pass can be elided.
enum BandwidthProbe {
  static let bytes = 256 << 20

  /// Billions of bytes per second.
  static func run(threads: Int, passes: Int = 2) -> Double {
    let count = bytes / MemoryLayout<Float>.stride
    let buffer = UnsafeMutablePointer<Float>.allocate(capacity: count)
    defer { buffer.deallocate() }
    buffer.initialize(repeating: 1, count: count)
    let workers = max(threads, 1)
    let share = (count / workers) & ~15
    let source = SharedBuffer(base: UnsafePointer(buffer))
    var best = 0.0
    for _ in 0..<(passes + 1) {
      let elapsed = Stopwatch.time {
        DispatchQueue.concurrentPerform(iterations: workers) { w in
          CoreProbe.blackHole(sum(source.base + w * share, count: share))
        }
      }
      best = max(best, Double(share * workers * MemoryLayout<Float>.stride) / elapsed * 1e-9)
    }
    return best
  }

  /// `Σ x[0..<count]` (`count` a multiple of 16) with four independent vector accumulators.
  @inline(never)
  private static func sum(_ x: UnsafePointer<Float>, count: Int) -> Float {
    var (a, b, c, d) = (SIMD16<Float>(), SIMD16<Float>(), SIMD16<Float>(), SIMD16<Float>())
    let raw = UnsafeRawPointer(x)
    var i = 0
    while i + 64 <= count {
      a += raw.loadUnaligned(fromByteOffset: i * 4, as: SIMD16<Float>.self)
      b += raw.loadUnaligned(fromByteOffset: (i + 16) * 4, as: SIMD16<Float>.self)
      c += raw.loadUnaligned(fromByteOffset: (i + 32) * 4, as: SIMD16<Float>.self)
      d += raw.loadUnaligned(fromByteOffset: (i + 48) * 4, as: SIMD16<Float>.self)
      i += 64
    }
    while i < count {
      a += raw.loadUnaligned(fromByteOffset: i * 4, as: SIMD16<Float>.self)
      i += 16
    }
    return (a + b + c + d).sum()
  }
}

/// The probe's buffer, read by every worker.
private struct SharedBuffer: @unchecked Sendable {
  let base: UnsafePointer<Float>
}
