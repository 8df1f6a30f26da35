//! Work spread over the machine's cores when there is a lot of it: a from-scratch
//! translation goes over every pod, and its snapshot encodes every resource (at 100,000 pods,
//! about 2 s and 0.5 s on one core, most of the controller's start-up after reading). A
//! change's handful of items stays on the calling thread.

/// Below this many items [`map`] stays on the calling thread: starting threads costs more
/// than a change's few items.
pub(crate) const PARALLEL_MIN: usize = 4096;

/// `f` over `items`, the results in the items' order: on as many threads as the machine has
/// cores when there are at least [`PARALLEL_MIN`]. A panic in `f` is raised again here.
pub(crate) fn map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if items.len() < PARALLEL_MIN || threads <= 1 {
        return items.iter().map(&f).collect();
    }
    let f = &f;
    std::thread::scope(|scope| {
        let parts: Vec<_> = items
            .chunks(items.len().div_ceil(threads))
            .map(|chunk| scope.spawn(move || chunk.iter().map(f).collect::<Vec<R>>()))
            .collect();
        parts
            .into_iter()
            .flat_map(|p| p.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    /// Results come back in the order of the items, on one thread or several.
    #[test]
    fn results_keep_the_order() {
        for len in [10, super::PARALLEL_MIN * 3 + 7] {
            let items: Vec<usize> = (0..len).collect();
            let out = super::map(&items, |x| x * 3);
            assert_eq!(out, items.iter().map(|x| x * 3).collect::<Vec<_>>());
        }
    }
}
