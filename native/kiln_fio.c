/*
 * kiln_fio.c: a fio external ioengine that drives kiln block devices in-process.
 *
 *   fio --ioengine=external:target/release/libkiln_fio.so --filename='malloc\:256M' ...
 *
 * The file name is a kiln device spec (malloc:SIZE, null:SIZE, file:PATH?..., delay:...,
 * error:..., anything src/bdev/spec.rs parses). fio splits file names at ':'; write
 * '\:' to keep a spec whole, or leave the colons alone: the engine rejoins pieces that
 * only parse as one spec together (malloc:256M arrives as "malloc" and "256M").
 *
 * Per fio job (thread or process) the engine keeps one kiln channel per file, so the
 * hot path takes no lock. fio's I/O buffers are carved from one kiln DMA region
 * (iomem_alloc), which the channels register (io_uring fixed buffers), so data moves
 * with no copy. ->queue() queues on the channel, ->commit() rings the device once per
 * batch, ->getevents() reaps completions in batches.
 *
 * Built by native/build.rs against the headers of the installed fio (ci/fio-headers.sh),
 * linked into libkiln_fio.so together with kiln (native/lib.rs exports get_ioengine).
 */
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fio.h"
#include "smalloc.h"

#include "kiln.h"

#define KILN_ERR_LEN 512
/* Empty polls before getevents() sleeps on the channels' notifier fds. */
#define KILN_SPIN_NS 50000

/* One file of one job: the device handle and, while fio has the file open, the channel. */
struct kiln_file {
	struct kiln_device *dev;
	struct kiln_channel *chan;
	int notify_fd;
};

/* One job's state (td->io_ops_data). */
struct kiln_job {
	struct kiln_file *files; /* by fio file number */
	unsigned int nr_files;
	struct kiln_dma *dma;	      /* fio's I/O buffers (iomem_alloc) */
	struct kiln_file **open;      /* files with a channel, polled by getevents */
	unsigned int nr_open;
	struct pollfd *fds;	      /* notifier fds of the open channels */
	struct io_u **events;	      /* completions for ->event() */
	struct kiln_completion *comps;
	struct io_u **queued;	      /* queued since the last commit (issue time) */
	unsigned int nr_queued;
	unsigned int depth;
};

static void kiln_log_error(struct thread_data *td, int err, const char *what, const char *msg)
{
	log_err("kiln: %s: %s\n", what, msg);
	td_vmsg(td, err, msg, what);
}

/*
 * fio cut the file name at every unescaped ':'. Rejoin consecutive pieces until they
 * parse as one device spec, so "malloc:256M" works without escaping. Idempotent: a
 * name that already parses stays as it is.
 */
static int kiln_rejoin_specs(struct thread_data *td)
{
	unsigned int n = td->files_index, out = 0, i = 0;

	while (i < n) {
		struct fio_file *first = td->files[i];
		char *joined = strdup(first->file_name);
		unsigned int j = i;

		while (joined && !kiln_spec_valid(joined) && j + 1 < n) {
			const char *next = td->files[++j]->file_name;
			char *longer = malloc(strlen(joined) + strlen(next) + 2);

			if (longer)
				sprintf(longer, "%s:%s", joined, next);
			free(joined);
			joined = longer;
		}
		if (!joined) {
			kiln_log_error(td, ENOMEM, "rejoin file names", "out of memory");
			return 1;
		}
		if (!kiln_spec_valid(joined)) {
			char err[KILN_ERR_LEN];
			struct kiln_device *probe = kiln_device_open(joined, err, sizeof(err));

			/* Not a spec: "open" it anyway for the parser's message, which names it. */
			kiln_device_close(probe);
			free(joined);
			kiln_log_error(td, EINVAL, "filename", err);
			return 1;
		}
		if (j > i) {
			char *name = smalloc_strdup(joined);

			if (!name) {
				free(joined);
				kiln_log_error(td, ENOMEM, "rejoin file names", "out of shared memory");
				return 1;
			}
			/* The pieces after the first are dropped from the job (fio never
			 * opened them); their names and structs are not freed. */
			sfree(first->file_name);
			first->file_name = name;
		}
		free(joined);
		first->fileno = out;
		td->files[out++] = first;
		i = j + 1;
	}
	if (out != n) {
		td->files_index = out;
		td->o.nr_files = out;
		if (td->o.open_files > out)
			td->o.open_files = out;
	}
	return 0;
}

/* The job state, created by whichever of ->setup() and ->init() fio calls first. */
static struct kiln_job *kiln_job_get(struct thread_data *td)
{
	struct kiln_job *job = td->io_ops_data;

	if (job)
		return job;
	if (kiln_rejoin_specs(td))
		return NULL;
	job = calloc(1, sizeof(*job));
	if (!job)
		return NULL;
	job->nr_files = td->files_index;
	job->files = calloc(job->nr_files ? job->nr_files : 1, sizeof(*job->files));
	job->open = calloc(job->nr_files ? job->nr_files : 1, sizeof(*job->open));
	job->fds = calloc(job->nr_files ? job->nr_files : 1, sizeof(*job->fds));
	if (!job->files || !job->open || !job->fds) {
		free(job->files);
		free(job->open);
		free(job->fds);
		free(job);
		return NULL;
	}
	td->io_ops_data = job;
	return job;
}

/* The file's device, opened on first use. */
static struct kiln_file *kiln_file_get(struct thread_data *td, struct fio_file *f)
{
	struct kiln_job *job = kiln_job_get(td);
	struct kiln_file *kf;
	char err[KILN_ERR_LEN];

	if (!job)
		return NULL;
	if (f->fileno < 0 || (unsigned int)f->fileno >= job->nr_files) {
		kiln_log_error(td, EINVAL, "file", "file number outside the job's files");
		return NULL;
	}
	kf = &job->files[f->fileno];
	if (!kf->dev) {
		kf->dev = kiln_device_open(f->file_name, err, sizeof(err));
		if (!kf->dev) {
			kiln_log_error(td, EINVAL, f->file_name, err);
			return NULL;
		}
		kf->notify_fd = -1;
	}
	f->engine_data = kf;
	return kf;
}

/* Sizes the files (fio calls this instead of stat()ing them). */
static int kiln_setup(struct thread_data *td)
{
	struct fio_file *f;
	unsigned int i;

	if (!kiln_job_get(td))
		return 1;
	for_each_file(td, f, i) {
		struct kiln_file *kf = kiln_file_get(td, f);
		uint32_t block;
		int ddir;

		if (!kf)
			return 1;
		block = kiln_device_block_size(kf->dev);
		for (ddir = 0; ddir < DDIR_RWDIR_CNT; ddir++) {
			if (td->o.min_bs[ddir] % block || td->o.max_bs[ddir] % block) {
				char msg[KILN_ERR_LEN];

				snprintf(msg, sizeof(msg),
					 "block sizes must be multiples of the device block size %u",
					 block);
				kiln_log_error(td, EINVAL, f->file_name, msg);
				return 1;
			}
		}
		f->real_file_size = kiln_device_size_bytes(kf->dev);
		f->filetype = FIO_TYPE_BLOCK;
		fio_file_set_size_known(f);
	}
	return 0;
}

static int kiln_init(struct thread_data *td)
{
	struct kiln_job *job = kiln_job_get(td);

	if (!job)
		return 1;
	job->depth = td->o.iodepth ? td->o.iodepth : 1;
	job->events = calloc(job->depth, sizeof(*job->events));
	job->queued = calloc(job->depth, sizeof(*job->queued));
	job->comps = calloc(job->depth, sizeof(*job->comps));
	if (!job->events || !job->queued || !job->comps) {
		kiln_log_error(td, ENOMEM, "init", "out of memory");
		return 1;
	}
	return 0;
}

/* fio's I/O buffers come from one kiln DMA region: buffer i of the region is io_u i's. */
static int kiln_iomem_alloc(struct thread_data *td, size_t total_mem)
{
	struct kiln_job *job = td->io_ops_data;
	char err[KILN_ERR_LEN];
	size_t len = 0;

	job->dma = kiln_dma_create(total_mem, td_max_bs(td), err, sizeof(err));
	if (!job->dma) {
		kiln_log_error(td, ENOMEM, "iomem_alloc", err);
		return 1;
	}
	td->orig_buffer = kiln_dma_base(job->dma, &len);
	assert(len >= total_mem);
	return 0;
}

static void kiln_iomem_free(struct thread_data *td)
{
	struct kiln_job *job = td->io_ops_data;

	/* Channels that registered the region keep it mapped until they close. */
	if (job) {
		kiln_dma_destroy(job->dma);
		job->dma = NULL;
	}
	td->orig_buffer = NULL;
}

static int kiln_open_file(struct thread_data *td, struct fio_file *f)
{
	struct kiln_file *kf = kiln_file_get(td, f);
	struct kiln_job *job = td->io_ops_data;
	char err[KILN_ERR_LEN];

	if (!kf)
		return 1;
	if (kf->chan)
		return 0;
	kf->chan = kiln_channel_open(kf->dev, job->dma, job->depth ? job->depth : td->o.iodepth,
				     err, sizeof(err));
	if (!kf->chan) {
		kiln_log_error(td, EIO, f->file_name, err);
		return 1;
	}
	kf->notify_fd = kiln_channel_notifier_fd(kf->chan);
	job->open[job->nr_open++] = kf;
	return 0;
}

static int kiln_close_file(struct thread_data *td, struct fio_file *f)
{
	struct kiln_job *job = td->io_ops_data;
	struct kiln_file *kf = f->engine_data;
	unsigned int i, left;

	if (!job || !kf || !kf->chan)
		return 0;
	for (i = 0; i < job->nr_open; i++) {
		if (job->open[i] == kf) {
			job->open[i] = job->open[--job->nr_open];
			break;
		}
	}
	left = kiln_channel_close(kf->chan);
	kf->chan = NULL;
	kf->notify_fd = -1;
	if (left) {
		log_err("kiln: %s: %u requests still in flight at close\n", f->file_name, left);
		return EIO;
	}
	return 0;
}

static enum fio_q_status kiln_queue(struct thread_data *td, struct io_u *io_u)
{
	struct kiln_job *job = td->io_ops_data;
	struct kiln_file *kf = io_u->file->engine_data;
	uint32_t op;
	int rc;

	fio_ro_check(td, io_u);

	switch (io_u->ddir) {
	case DDIR_READ:
		op = KILN_OP_READ;
		break;
	case DDIR_WRITE:
		op = KILN_OP_WRITE;
		break;
	case DDIR_TRIM:
		op = KILN_OP_TRIM;
		break;
	case DDIR_SYNC:
	case DDIR_DATASYNC:
	case DDIR_SYNC_FILE_RANGE:
		op = KILN_OP_FLUSH;
		break;
	default:
		io_u->error = EINVAL;
		return FIO_Q_COMPLETED;
	}
	if (io_u->xfer_buflen > UINT32_MAX) {
		io_u->error = EINVAL;
		return FIO_Q_COMPLETED;
	}
	rc = kiln_channel_submit(kf->chan, op, io_u->offset, (uint32_t)io_u->xfer_buflen,
				 io_u->xfer_buf, (uint64_t)(uintptr_t)io_u);
	if (rc == -EAGAIN)
		return FIO_Q_BUSY;
	if (rc) {
		io_u->error = -rc;
		return FIO_Q_COMPLETED;
	}
	job->queued[job->nr_queued++] = io_u;
	return FIO_Q_QUEUED;
}

/* One doorbell per channel for the whole batch; one clock read for its issue times. */
static int kiln_commit(struct thread_data *td)
{
	struct kiln_job *job = td->io_ops_data;
	unsigned int i;

	if (job->nr_queued && fio_fill_issue_time(td)) {
		struct timespec now;

		fio_gettime(&now, NULL);
		for (i = 0; i < job->nr_queued; i++) {
			job->queued[i]->issue_time = now;
			io_u_queued(td, job->queued[i]);
		}
	}
	job->nr_queued = 0;
	for (i = 0; i < job->nr_open; i++)
		kiln_channel_submit_pending(job->open[i]->chan);
	return 0;
}

static uint64_t kiln_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Nothing completed for a while: sleep on the channels' fds (1 ms at most) or yield. */
static void kiln_wait(struct kiln_job *job)
{
	unsigned int i, n = 0;

	for (i = 0; i < job->nr_open; i++) {
		if (job->open[i]->notify_fd >= 0) {
			job->fds[n].fd = job->open[i]->notify_fd;
			job->fds[n].events = POLLIN;
			job->fds[n].revents = 0;
			n++;
		}
	}
	if (n)
		poll(job->fds, n, 1);
	else
		sched_yield();
}

static int kiln_getevents(struct thread_data *td, unsigned int min, unsigned int max,
			  const struct timespec *t)
{
	struct kiln_job *job = td->io_ops_data;
	uint64_t start_ns = 0, limit_ns = 0, idle_since_ns = 0;
	unsigned int got = 0;

	if (max > job->depth)
		max = job->depth;
	if (t) {
		start_ns = kiln_now_ns();
		limit_ns = (uint64_t)t->tv_sec * 1000000000ull + (uint64_t)t->tv_nsec;
	}
	for (;;) {
		unsigned int i, k, before = got;

		for (i = 0; i < job->nr_open && got < max; i++) {
			struct kiln_channel *chan = job->open[i]->chan;
			uint32_t n;

			kiln_channel_submit_pending(chan);
			n = kiln_channel_poll(chan, job->comps, max - got);
			for (k = 0; k < n; k++) {
				struct io_u *io_u = (struct io_u *)(uintptr_t)job->comps[k].tag;
				int32_t result = job->comps[k].result;

				if (result < 0) {
					io_u->error = -result;
					io_u->resid = io_u->xfer_buflen;
				} else {
					io_u->error = 0;
				}
				job->events[got++] = io_u;
			}
		}
		if (got >= min || got == max)
			break;
		if (t && kiln_now_ns() - start_ns >= limit_ns)
			break;
		if (got != before) {
			idle_since_ns = 0;
		} else if (!idle_since_ns) {
			idle_since_ns = kiln_now_ns();
		} else if (kiln_now_ns() - idle_since_ns > KILN_SPIN_NS) {
			kiln_wait(job);
		}
	}
	return got;
}

static struct io_u *kiln_event(struct thread_data *td, int event)
{
	struct kiln_job *job = td->io_ops_data;

	return job->events[event];
}

static void kiln_cleanup(struct thread_data *td)
{
	struct kiln_job *job = td->io_ops_data;
	unsigned int i;

	if (!job)
		return;
	for (i = 0; i < job->nr_files; i++) {
		kiln_channel_close(job->files[i].chan);
		kiln_device_close(job->files[i].dev);
	}
	kiln_dma_destroy(job->dma);
	free(job->files);
	free(job->open);
	free(job->fds);
	free(job->events);
	free(job->queued);
	free(job->comps);
	free(job);
	td->io_ops_data = NULL;
}

static struct ioengine_ops kiln_ioengine = {
	.name = "kiln",
	.version = FIO_IOOPS_VERSION,
	/*
	 * DISKLESSIO: the file name is a device spec, not a path. NO_OFFLOAD: a channel
	 * belongs to one thread. ASYNCIO_SETS_ISSUE_TIME: ->commit() stamps the batch.
	 */
	.flags = FIO_RAWIO | FIO_NOEXTEND | FIO_NODISKUTIL | FIO_MEMALIGN | FIO_DISKLESSIO |
		 FIO_NO_OFFLOAD | FIO_ASYNCIO_SETS_ISSUE_TIME,
	.setup = kiln_setup,
	.init = kiln_init,
	.queue = kiln_queue,
	.commit = kiln_commit,
	.getevents = kiln_getevents,
	.event = kiln_event,
	.cleanup = kiln_cleanup,
	.open_file = kiln_open_file,
	.close_file = kiln_close_file,
	.iomem_alloc = kiln_iomem_alloc,
	.iomem_free = kiln_iomem_free,
};

/*
 * fio looks up the symbol "ioengine", then "get_ioengine". A Rust cdylib exports only
 * Rust's own symbols, so native/lib.rs exports get_ioengine and calls this.
 */
struct ioengine_ops *kiln_fio_ioengine(void)
{
	return &kiln_ioengine;
}
