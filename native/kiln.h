/*
 * kiln's C ABI (src/ffi.rs): open devices from kiln device specs, open one
 * channel per thread, submit, submit the batch, poll completions, DMA regions.
 *
 * Every handle is opaque. A channel belongs to the thread that opened it and
 * takes no lock; devices and DMA regions may be shared between threads.
 */
#ifndef KILN_H
#define KILN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct kiln_device;
struct kiln_dma;
struct kiln_channel;

/* Layout checked against Rust's bdev::Completion by const assertions in src/ffi.rs. */
struct kiln_completion {
	uint64_t tag;
	int32_t result; /* 0 or a negative errno */
};
_Static_assert(sizeof(struct kiln_completion) == 16, "struct kiln_completion is 16 bytes");

enum kiln_op {
	KILN_OP_READ = 0,
	KILN_OP_WRITE = 1,
	KILN_OP_FLUSH = 2,
	KILN_OP_WRITE_ZEROES = 3,
	KILN_OP_TRIM = 4,
};

bool kiln_spec_valid(const char *spec);

/* Handles on the same spec text share one device within a process. */
struct kiln_device *kiln_device_open(const char *spec, char *err, size_t err_len);
uint64_t kiln_device_size_bytes(const struct kiln_device *dev);
uint32_t kiln_device_block_size(const struct kiln_device *dev);
void kiln_device_close(struct kiln_device *dev);

struct kiln_dma *kiln_dma_create(size_t bytes_min, size_t buf_bytes, char *err, size_t err_len);
void *kiln_dma_base(const struct kiln_dma *dma, size_t *len);
void kiln_dma_destroy(struct kiln_dma *dma);

struct kiln_channel *kiln_channel_open(const struct kiln_device *dev, const struct kiln_dma *dma,
				       uint32_t queue_depth, char *err, size_t err_len);
/* 0, -EAGAIN (queue full), -EINVAL, -EOPNOTSUPP. */
int kiln_channel_submit(struct kiln_channel *chan, uint32_t op, uint64_t offset, uint32_t len,
			void *buf, uint64_t tag);
uint32_t kiln_channel_submit_pending(struct kiln_channel *chan);
uint32_t kiln_channel_poll(struct kiln_channel *chan, struct kiln_completion *out, uint32_t max);
uint32_t kiln_channel_inflight(const struct kiln_channel *chan);
int kiln_channel_notifier_fd(const struct kiln_channel *chan);
/* Waits for requests in flight (at most 10 s); returns how many were left. */
uint32_t kiln_channel_close(struct kiln_channel *chan);

#endif
