// The submission thread of stream-ordered CPU experts (moe_host_job.hpp): one per process, started on
// the first submission, a FIFO of jobs under a mutex. Jobs run in submission order, so a later job's
// wait also covers every earlier submission (deferred experts rely on that).
#include "moe_host_job.hpp"

#include <condition_variable>
#include <deque>
#include <exception>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>

#include <unistd.h>

#include "thread_pool.hpp"

namespace kt {
namespace moe {
namespace {

class SubmissionThread {
 public:
  void push(HostJob* job) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (started_pid_ != getpid()) {  // first use, or a forked child (which has no such thread)
        q_.clear();
        std::thread(&SubmissionThread::loop, this).detach();  // lives as long as the process
        started_pid_ = getpid();
      }
      q_.push_back(job);
    }
    cv_.notify_one();
  }
  // Until job->done reaches `target`: spin briefly (decode steps are short), then sleep on the condvar.
  void wait(HostJob* job, uint64_t target) {
    int64_t spins = 0;
    while (job->done.load(std::memory_order_acquire) < target) {
      if (++spins < 4000) {
        spin_backoff(spins);
        continue;
      }
      std::unique_lock<std::mutex> lk(mu_);
      done_cv_.wait(lk, [&] { return job->done.load(std::memory_order_acquire) >= target; });
    }
  }

 private:
  void loop() {
    for (;;) {
      HostJob* job;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return !q_.empty(); });
        job = q_.front();
        q_.pop_front();
      }
      try {
        check_ids(*job);
        forward(*job->weights, job->x, job->tokens, job->ids, job->w, job->topk, job->out, *job->kernels, job->threads);
      } catch (const std::exception& e) {
        fail(job, e.what());
      } catch (...) {
        fail(job, "unknown error");
      }
      {
        std::lock_guard<std::mutex> lk(mu_);
        job->done.fetch_add(1, std::memory_order_acq_rel);
      }
      done_cv_.notify_all();
    }
  }
  // The buffers were filled by the stream since the job was made: ids are checked at every run (forward
  // indexes by them); x and the weights are not (a non-finite value gives non-finite output rows).
  static void check_ids(const HostJob& job) {
    const int64_t E = job.weights->cfg.experts;
    for (int64_t i = 0; i < job.tokens * job.topk; ++i)
      if (job.ids[i] < -1 || job.ids[i] >= E)
        throw std::invalid_argument("topk_ids[" + std::to_string(i / job.topk) + ", " + std::to_string(i % job.topk) +
                                    "] = " + std::to_string(job.ids[i]) + " is out of range [0, " + std::to_string(E) +
                                    ") (-1: a skipped slot)");
  }
  static void fail(HostJob* job, const char* what) {
    job->last_error = what;
    const int64_t n = job->tokens * job->weights->cfg.hidden;
    for (int64_t i = 0; i < n; ++i) job->out[i] = std::numeric_limits<float>::quiet_NaN();
    job->failures.fetch_add(1, std::memory_order_acq_rel);
  }

  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::deque<HostJob*> q_;
  pid_t started_pid_ = 0;
};

SubmissionThread& submission_thread() {
  static SubmissionThread* t = new SubmissionThread();  // never destroyed: the detached thread uses it
  return *t;
}

}  // namespace

void host_submit(void* p) {
  HostJob* job = static_cast<HostJob*>(p);
  job->submitted.fetch_add(1, std::memory_order_acq_rel);
  submission_thread().push(job);
}

void host_wait(void* p) {
  HostJob* job = static_cast<HostJob*>(p);
  submission_thread().wait(job, job->submitted.load(std::memory_order_acquire));
}

}  // namespace moe
}  // namespace kt
