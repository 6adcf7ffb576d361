import Foundation

/// One progress line on stderr, rewritten in place, for work that takes more than a moment —
/// only when stderr is a terminal, so pipes, logs and tests get nothing extra.
///
/// `show` writes at once (for loops whose steps are announced: the complexity sweep, bench);
/// `during` writes only when its work is still running after `delay` seconds, then counts the
/// seconds, and clears the line when the work ends (for single long steps: a kernel on a long
/// sequence, reading a large file, the checks).
final class Progress: @unchecked Sendable {
  /// Whether stderr is a terminal.
  let isEnabled: Bool
  private let lock = NSLock()

  init(enabled: Bool = isatty(STDERR_FILENO) == 1) { isEnabled = enabled }

  func show(_ text: String) {
    guard isEnabled else { return }
    write("\r\u{1B}[K\(text)")
  }

  func clear() {
    guard isEnabled else { return }
    write("\r\u{1B}[K")
  }

  /// Runs `body`; if it takes longer than `delay` seconds, shows `text` with the elapsed seconds,
  /// updated every second, until it returns.
  func during<Result>(
    _ text: String, delay: Double = 1.5, _ body: () throws -> Result
  ) rethrows -> Result {
    guard isEnabled else { return try body() }
    let start = Date()
    let timer = DispatchSource.makeTimerSource(queue: .global(qos: .utility))
    timer.schedule(deadline: .now() + delay, repeating: 1)
    timer.setEventHandler { [self] in
      show("\(text)… \(Int(Date().timeIntervalSince(start)))s")
    }
    timer.resume()
    defer {
      timer.cancel()
      if Date().timeIntervalSince(start) >= delay { clear() }
    }
    return try body()
  }

  private func write(_ text: String) {
    lock.lock()
    defer { lock.unlock() }
    // A failed write to the terminal is not worth failing the run for.
    let bytes = Array(text.utf8)
    _ = bytes.withUnsafeBytes { Glibc.write(STDERR_FILENO, $0.baseAddress, $0.count) }
  }
}
