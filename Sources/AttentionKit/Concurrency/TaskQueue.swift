import Synchronization

/// The next task index, shared by the workers of one kernel call.
///
/// Every parallel kernel runs the same way: `DispatchQueue.concurrentPerform` starts its workers,
/// and each takes the next index until none is left (`while case let t = queue.take(), t < n`).
/// Which worker runs a task never changes how the task is computed, so results do not depend on
/// the thread count.
final class TaskQueue: Sendable {
  private let next = Atomic<Int>(0)

  func take() -> Int { next.wrappingAdd(1, ordering: .relaxed).oldValue }
}

/// A pointer shared by tasks that write disjoint parts of what it points to.
struct SharedPointer: @unchecked Sendable {
  let pointer: UnsafeMutablePointer<Float>
  init(_ pointer: UnsafeMutablePointer<Float>) { self.pointer = pointer }
}
