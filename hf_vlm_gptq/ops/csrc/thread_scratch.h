/* Per-thread work buffers kept from one kernel call to the next.
 *
 * A buffer of a few MB allocated and freed on every call is fresh memory from the operating system each time
 * (glibc maps large blocks afresh), and its first touch faults in every page: for a 4096 x 1280 input the
 * AMX kernel's tile copy of x alone cost about as much as the product. scratch_get(slot, bytes) hands the
 * calling thread its buffer for `slot`, grown when too small, 64-byte aligned; buffers up to
 * SCRATCH_KEEP_BYTES stay for the thread's next call (scratch_done frees a larger one), and all of a thread's
 * buffers are freed when the thread ends. The library is never unloaded (ctypes keeps it), so the destructor
 * stays valid. */
#ifndef HVG_THREAD_SCRATCH_H
#define HVG_THREAD_SCRATCH_H

#include <pthread.h>
#include <stdlib.h>

#define SCRATCH_SLOTS 4
#define SCRATCH_KEEP_BYTES ((size_t)32 << 20)

typedef struct {
    void *ptr[SCRATCH_SLOTS];
    size_t cap[SCRATCH_SLOTS];
} scratch_set;

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static int scratch_key_ok = 0;

static void scratch_free_set(void *p) {
    scratch_set *s = p;
    for (int i = 0; i < SCRATCH_SLOTS; i++) free(s->ptr[i]);
    free(s);
}

static void scratch_init(void) { scratch_key_ok = pthread_key_create(&scratch_key, scratch_free_set) == 0; }

/* this thread's buffer `slot` of at least `bytes` (NULL when out of memory; contents undefined) */
static void *scratch_get(int slot, size_t bytes) {
    pthread_once(&scratch_once, scratch_init);
    if (!scratch_key_ok || slot < 0 || slot >= SCRATCH_SLOTS) return NULL;
    scratch_set *s = pthread_getspecific(scratch_key);
    if (!s) {
        s = calloc(1, sizeof *s);
        if (!s) return NULL;
        if (pthread_setspecific(scratch_key, s) != 0) {
            free(s);
            return NULL;
        }
    }
    if (s->cap[slot] < bytes) {
        const size_t rounded = (bytes + 63) / 64 * 64;
        free(s->ptr[slot]);
        s->ptr[slot] = aligned_alloc(64, rounded);
        s->cap[slot] = s->ptr[slot] ? rounded : 0;
    }
    return s->ptr[slot];
}

/* after a call: a buffer of `slot` larger than SCRATCH_KEEP_BYTES is freed, not kept */
static void scratch_done(int slot) {
    scratch_set *s = scratch_key_ok ? pthread_getspecific(scratch_key) : NULL;
    if (s && slot >= 0 && slot < SCRATCH_SLOTS && s->cap[slot] > SCRATCH_KEEP_BYTES) {
        free(s->ptr[slot]);
        s->ptr[slot] = NULL;
        s->cap[slot] = 0;
    }
}

#endif
