import AttentionKit
import AttentionVerification
import Foundation

/// Picks a fast OpenBLAS kernel on CPUs newer than the installed OpenBLAS.
///
/// Debian 12's OpenBLAS 0.3.21 chooses its kernels by CPU model, and a model it does not know
/// (Intel's Sapphire and Emerald Rapids, for one) falls back to "Prescott", SSE3 code about 4×
/// slower than the AVX-512 "SkylakeX" kernels the CPU can run. OpenBLAS reads `OPENBLAS_CORETYPE`
/// when it loads, before `main`, so `attn` re-executes itself once with the variable set to the
/// best family the CPU's flags support. Results are still checked against the float64 reference
/// by every command. A user's own `OPENBLAS_CORETYPE` is respected, and
/// `ATTN_KEEP_OPENBLAS_CORE` set to anything but empty or `0` turns this off (`0` and empty
/// mean unset).
enum OpenBLASCore {
  /// Set in the re-executed process, so that it never re-executes again.
  static let reexecutedMarker = "ATTN_OPENBLAS_CORE_REEXECUTED"

  static func upgradeIfNeeded() {
    let environment = ProcessInfo.processInfo.environment
    guard environment["OPENBLAS_CORETYPE"] == nil, !keepsCore(environment),
      environment[reexecutedMarker] == nil,
      BLAS.coreName == "Prescott", let better = bestCoreForThisCPU()
    else { return }
    setenv("OPENBLAS_CORETYPE", better, 1)
    // Only once: if the exec fails or OpenBLAS ignores the variable, carry on as we are.
    setenv(reexecutedMarker, "1", 1)
    let arguments = CommandLine.arguments
    var argv: [UnsafeMutablePointer<CChar>?] = arguments.map { strdup($0) }
    argv.append(nil)
    execv("/proc/self/exe", &argv)
  }

  /// Whether `ATTN_KEEP_OPENBLAS_CORE` asks to keep OpenBLAS's own choice.
  static func keepsCore(_ environment: [String: String]) -> Bool {
    guard let value = environment["ATTN_KEEP_OPENBLAS_CORE"] else { return false }
    return !value.isEmpty && value != "0"
  }

  /// "SkylakeX" with AVX-512 (F, BW, VL, DQ), "Haswell" with AVX2 and FMA, else `nil`.
  static func bestCoreForThisCPU() -> String? {
    guard let info = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8),
      let line = info.split(separator: "\n").first(where: { $0.hasPrefix("flags") })
    else { return nil }
    let flags = Set(line.split(separator: " ").map(String.init))
    if ["avx512f", "avx512bw", "avx512vl", "avx512dq"].allSatisfy(flags.contains) {
      return "SkylakeX"
    }
    if ["avx2", "fma"].allSatisfy(flags.contains) { return "Haswell" }
    return nil
  }
}
