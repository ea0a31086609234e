# Dynamic work distribution for the kernels' parallel loops.
#
# MAX's `parallelize(func, n)` splits the n items into one contiguous range per worker, fixed in advance
# (checked with a standalone Mojo program on this 2-core machine: of 8 items, 0-3 costing 22 ms each and 4-7
# nothing, items 0-3 ran one after the other on one worker, 88 ms in all; with parallelize_dynamic, 44 ms).
# Where items differ in cost (attention's query tiles sorted longest first, experts with different row counts)
# that leaves one core idle for a large part of the call, and a descheduled worker's range waits for it. Here
# every worker takes the next item from a shared atomic counter instead, so the cores finish together; the
# counter costs one atomic add per item, nothing next to items of a few microseconds or more. Small, equal items
# keep `parallelize`.
from max.algorithm import parallelize
from std.atomic import Atomic
from std.runtime import parallelism_level


def parallelize_dynamic[FuncType: def(Int) -> None](func: FuncType, num_work_items: Int):
    """Runs func(0) .. func(num_work_items - 1) on all workers, each taking the next unclaimed item."""
    var workers = min(parallelism_level(), num_work_items)
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
