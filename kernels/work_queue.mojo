# Dynamic work distribution for the kernels' parallel loops.
#
# MAX's `parallelize(func, n)` splits the n items into one contiguous range per worker, fixed in advance
# (checked with a standalone Mojo program on this 2-core machine: of 8 items, 0-3 costing 22 ms each and 4-7
# nothing, items 0-3 ran one after the other on one worker, 88 ms in all; with parallelize_dynamic, 44 ms).
# Where items differ in cost (attention's query tiles sorted longest first, experts with different row counts)
# that leaves one core idle for a large part of the call, and a descheduled worker's range waits for it. Here
# every worker takes the next item from a shared atomic counter instead, so the cores finish together; the
# counter costs one atomic add per item, nothing next to items of a few microseconds or more. Small, equal items
# keep MAX's split (`parallelize_sized`).
#
# Small passes run on the calling core: handing a pass to MAX's workers costs ~12 us in these VMs (a chain of
# linear calls on 32 x 32 weights, float32: 13.1 us a call through parallelize, 1.1 us inline), and a decode
# step of `small` makes ~60 such passes. Measured on L2-resident weights (docs/perf-notes.md, "fixed cost of an
# op call"), one core matched two up to ~1 MB (K 512 x 512 bf16: 21.6 us inline, 26.9 us on two cores; f32 1 MB:
# 29.3 / 29.1 us) and lost above it (2 MB bf16: 60.2 / 47.0 us). So a pass moving less than PARALLEL_MIN_BYTES
# runs inline (`workers_for`), whichever of the two helpers it goes through.
from max.algorithm import parallelize
from std.atomic import Atomic
from std.runtime import parallelism_level

comptime PARALLEL_MIN_BYTES = 512 << 10  # a pass moving less memory than this runs on the calling core (see above)


def workers_for(num_work_items: Int, work_bytes: Int) -> Int:
    """How many workers a pass of num_work_items items over work_bytes of memory (weights, activations: what it
    reads and writes) gets: one below PARALLEL_MIN_BYTES, else every worker (at most one per item)."""
    if work_bytes < PARALLEL_MIN_BYTES:
        return min(1, num_work_items)
    return min(parallelism_level(), num_work_items)


def parallelize_sized[FuncType: def(Int) -> None](func: FuncType, num_work_items: Int, work_bytes: Int):
    """MAX's parallelize (one contiguous range of items per worker) for a pass over work_bytes of memory, or the
    items in order on this core when the pass is small (`workers_for`)."""
    if workers_for(num_work_items, work_bytes) <= 1:
        for i in range(num_work_items):
            func(i)
        return
    parallelize(func, num_work_items)


def parallelize_dynamic[FuncType: def(Int) -> None](func: FuncType, num_work_items: Int, work_bytes: Int = Int.MAX):
    """Runs func(0) .. func(num_work_items - 1) on all workers, each taking the next unclaimed item; on this core
    alone when the pass over work_bytes of memory is small (`workers_for`; the default: a large pass)."""
    var workers = workers_for(num_work_items, work_bytes)
    if workers <= 1:
        for i in range(num_work_items):
            func(i)
        return
    var counter = List[Int](length=1, fill=0)
    var next_item = counter.unsafe_ptr()

    def worker(w: Int) {var next_item, ref func, var num_work_items}:
        while True:
            var i = Atomic.fetch_add(next_item, 1)
            if i >= num_work_items:
                return
            func(i)

    parallelize(worker, workers)


def sort_codes_by_cost(mut keyed: List[Int], n_codes: Int):
    """keyed[i] = cost * n_codes + code, with 0 <= code < n_codes: sorts by cost, then code, and leaves the codes.
    Callers that want the most expensive items first pass a shortfall (most - cost) as the cost."""
    sort(keyed)
    for i in range(len(keyed)):
        keyed[i] = keyed[i] % n_codes
