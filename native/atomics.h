/*
 * tdp-stress native layer: 64-bit atomics and locks on words of a shared
 * memory segment, addressed as (base, word index) so Python never builds a
 * pointer per access.  Every function is sequentially consistent unless its
 * name says otherwise (load = acquire, store = release), which is stronger
 * than the kernel needs and keeps the model's reasoning simple.
 *
 * Spinning functions take an `abort_i` word: when it becomes non-zero they
 * give up and return -1, so a worker whose peer died holding a lock can be
 * stopped by the supervisor instead of spinning for ever.
 *
 * This header is also the cffi cdef: no preprocessor directives below.
 */
uint64_t ts_load(uint64_t *base, size_t i);
void ts_store(uint64_t *base, size_t i, uint64_t v);
uint64_t ts_cmpxchg(uint64_t *base, size_t i, uint64_t old, uint64_t new_);
uint64_t ts_xchg(uint64_t *base, size_t i, uint64_t v);
uint64_t ts_fetch_add(uint64_t *base, size_t i, uint64_t v);
uint64_t ts_fetch_and(uint64_t *base, size_t i, uint64_t v);
uint64_t ts_fetch_or(uint64_t *base, size_t i, uint64_t v);
void ts_cpu_relax(void);
void ts_spin_ns(uint64_t ns);
uint64_t ts_now_ns(void);

/* mmu_lock: reader-writer lock in one word (bit 63 writer, bit 62 writer
 * waiting, bits 32-47 tasks queued for it, readers and writers alike, low 32
 * bits reader count); the writer's pid goes to owner_i.  contended: a writer
 * waits or any task is queued (qrwlock's queued_rwlock_is_contended). */
int ts_read_lock(uint64_t *base, size_t lock_i, size_t abort_i);
int ts_read_trylock(uint64_t *base, size_t lock_i);
void ts_read_unlock(uint64_t *base, size_t lock_i);
int ts_write_lock(uint64_t *base, size_t lock_i, size_t owner_i, uint64_t pid, size_t abort_i);
void ts_write_unlock(uint64_t *base, size_t lock_i, size_t owner_i);
int ts_write_trylock(uint64_t *base, size_t lock_i, size_t owner_i, uint64_t pid);
int ts_rwlock_contended(uint64_t *base, size_t lock_i);

/* spinlock: the word holds the holder's pid, 0 when free. */
int ts_spin_lock(uint64_t *base, size_t i, uint64_t pid, size_t abort_i);
int ts_spin_trylock(uint64_t *base, size_t i, uint64_t pid);
void ts_spin_unlock(uint64_t *base, size_t i);

/* Compound helpers (one FFI crossing for a loop the protocol defines). */
void ts_fill(uint64_t *base, size_t start, size_t n, uint64_t v);
int64_t ts_bitmap_alloc(uint64_t *base, size_t bm_i, size_t nwords, size_t start_word);
int64_t ts_popcount_range(uint64_t *base, size_t start, size_t n);
int64_t ts_freeze_children(uint64_t *base, size_t start, size_t n, uint64_t frozen,
                           uint64_t present_mask, int freeze_nonpresent, size_t abort_i,
                           uint32_t *out_idx, uint64_t *out_old);
int64_t ts_count_equal(uint64_t *base, size_t start, size_t n, uint64_t v);
int64_t ts_find_mask(uint64_t *base, size_t start, size_t n, uint64_t mask);
int64_t ts_scan_ne(uint64_t *base, size_t start, size_t n, uint64_t v,
                   uint32_t *out_idx, uint64_t *out_val);
/* Trace ring: append (seq, now_ns, kind, a, b, c) to a per-process ring of
 * 2**k entries of 6 words; seq is a global order from a shared counter. */
void ts_trace(uint64_t *base, size_t ring_i, uint64_t mask, size_t head_i, size_t seq_i,
              uint64_t kind, uint64_t a, uint64_t b, uint64_t c);
/* Controlled scheduling: turn words.  A worker waits until its turn word is
 * non-zero (spinning briefly, then sleeping on a futex), consumes it and
 * returns 0, or returns -1 once the abort word is set.  turn_give sets the
 * word and wakes its waiter. */
int ts_turn_wait(uint64_t *base, size_t turn_i, size_t abort_i);
void ts_turn_give(uint64_t *base, size_t turn_i);

/* The same with the ring's coordinates in tc[] = {enabled, ring_i, mask, head_i,
 * seq_i, worker << 16} (a no-op unless enabled). */
void ts_trace_cfg(uint64_t *base, const uint64_t *tc, uint64_t kind, uint64_t a, uint64_t b,
                  uint64_t c);
/* mmu_lock for read with lockdep's record: read_lock, store `mode` to mode_i,
 * trace (kind, a); the unlock does it backwards (trace, store, read_unlock). */
int ts_read_lock_rec(uint64_t *base, size_t lock_i, size_t abort_i, size_t mode_i,
                     uint64_t mode, const uint64_t *tc, uint64_t kind, uint64_t a);
void ts_read_unlock_rec(uint64_t *base, size_t lock_i, size_t mode_i, uint64_t mode,
                        const uint64_t *tc, uint64_t kind, uint64_t a);
/* xchg word dst_i to the value of word src_i (loaded first); returns dst's old value. */
uint64_t ts_xchg_from(uint64_t *base, size_t dst_i, size_t src_i);
/*
 * The TDP iterator's walk for one gfn (tdp_iter_start at `level`, 0 for the
 * root's own role.level, then try_step_down while the entry is a present
 * non-leaf above stop_level), with the model's
 * use-after-free oracle; see Words.tdp_walk for the contract.  p holds the
 * layout and SPTE encoding (TS_WP_* order, atomics.c); out receives TS_WO_*
 * (atomics.c), the table and generation per level at out[10 + level] and
 * out[16 + level].  Returns a TS_WALK_* status.
 */
int64_t ts_tdp_walk(uint64_t *base, const uint64_t *p, uint64_t root, uint64_t gfn,
                    int64_t level, int64_t stop_level, uint64_t *out);
