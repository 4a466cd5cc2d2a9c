/* main.c — mtnlgd. Today: `mtnlgd --standalone JOB.json`, training on this
 * machine alone without a rendezvous (like `torchrun --standalone`). The node
 * daemon (node config, rendezvous, control plane) grows around this. */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "blas.h"
#include "config.h"
#include "device.h"
#include "err.h"
#include "job.h"
#include "local.h"
#include "log.h"
#include "monotime.h"
#include "mt_config.h"
#include "node.h"
#include "plan.h"
#include "safetensors.h"
#include "steplog.h"
#include "tboard.h"
#include "threads.h"
#include "train.h"

#define MAX_OVERRIDES 64

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig) {
  if (stop_requested) { /* second signal: stop now */
    signal(sig, SIG_DFL);
    raise(sig);
  }
  __atomic_store_n(&stop_requested, 1, __ATOMIC_RELEASE); /* rank threads read it */
}

static void usage(FILE *out) {
  fprintf(out,
          "usage: mtnlgd --config FILE [--set SECTION.KEY=VALUE]... [--job-set KEY=VALUE]...\n"
          "       mtnlgd --standalone JOB.json [options]\n"
          "\n"
          "The node daemon: joins the rendezvous named in the node config (hosting it when\n"
          "the endpoint is this node), takes its share of the job's ranks, trains.\n"
          "\n"
          "  --config FILE             node config (INI), e.g. /etc/mtnlg/mtnlgd.conf\n"
          "  --set SECTION.KEY=VALUE   override a node config key (repeatable), e.g.\n"
          "                            node.devices=cpu:2\n"
          "  --job-set KEY=VALUE       override a field of the job file, e.g.\n"
          "                            train.steps=20; every node with the job\n"
          "                            file needs the same ones (the job's hash)\n"
          "\n"
          "Trains the job on this machine alone, without a rendezvous.\n"
          "\n"
          "  --standalone JOB.json     job spec (model, parallel, train, data, checkpoint)\n"
          "  --set SECTION.KEY=VALUE   override a job field (repeatable), e.g. train.steps=20\n"
          "  --devices DEVICES         cpu (default): one CPU device per rank, one thread\n"
          "                            each, sharing this machine's cores; cpu:N the same,\n"
          "                            N being the ranks this process runs (tp x pp x\n"
          "                            dp_min, over --procs), which the job sets; cuda:0-7 or\n"
          "                            cuda:0,2: rank k of this process on the k-th GPU\n"
          "                            listed (GPU groups talk over NCCL); cuda: the first\n"
          "                            GPUs; auto: GPUs when there are, else one CPU device\n"
          "  --export PATH             write the trained weights as GPT-2 safetensors (PATH/:\n"
          "                            Hugging Face's sharded layout) with config.json, in\n"
          "                            checkpoint.export_dtype (fp32, bf16, fp16)\n"
          "  --presets DIR             extra directory of model presets (<name>.json)\n"
          "  --procs N --proc-rank I --store DIR\n"
          "                            spread the ranks over N processes on this machine, this\n"
          "                            one running the I-th share, bootstrapping through a file\n"
          "                            store in DIR (development and tests; clusters use the\n"
          "                            rendezvous of the node daemon)\n"
          "  --comm-timeout-ms MS      deadline of every collective (default 300000)\n"
          "  --log-format text|json    per-step lines for people or for programs (stdout)\n"
          "  --log-level LEVEL         error, warn, info (default) or debug (stderr)\n"
          "  --version, --help\n"
          "\n"
          "Exit status, both modes: 0 finished or stopped; 1 a failure another start may\n"
          "get past (a lost peer or process, a collective that timed out, storage that\n"
          "could not be read): start it again (systemd restarts the node daemon); 2 the\n"
          "job or the command line is at fault (a config or job that cannot run, data\n"
          "that cannot be read, a stop or last step whose checkpoint failed): the same\n"
          "start would fail the same way.\n");
}

typedef struct step_printer {
  int json;
  int64_t steps;
  int log_every;
  int unsaved; /* the run stopped or ended, but its checkpoint failed */
  mt_steplog_acc acc;
  mt_tboard *tboard;       /* train.tensorboard_dir's writer, or NULL */
  const char *const *gpus; /* this process's GPUs' specs (n_gpus of them) */
  int n_gpus;
  int memory_logged;  /* mt_log_memory, after the first step */
  mt_evallog evallog; /* a long validation or test pass's progress lines */
} step_printer;

/* A stop (or the end) whose checkpoint failed: the run ends there, but the
 * steps since the newest checkpoint are lost, which the exit code says. */
static void on_stopped(int64_t step, int why, const char *save_failed, int64_t saved, void *arg) {
  (void)step, (void)why, (void)saved;
  if (save_failed) ((step_printer *)arg)->unsaved = 1;
}

static void on_step(const mt_step_stats *st, void *arg) {
  step_printer *p = arg;
  mt_steplog(&p->acc, st, p->steps, p->log_every, p->json);
  mt_tboard_step(p->tboard, st);
  if (!p->memory_logged) mt_log_memory(p->gpus, p->n_gpus, st);
  p->memory_logged = 1;
}

static void on_eval(const mt_eval_progress *pr, void *arg) {
  mt_evallog_progress(&((step_printer *)arg)->evallog, pr, mt_mono_ms(), MT_EVALLOG_EVERY_MS);
}

/* At the exit, TensorBoard writers mt_tboard_free left (their disk slow
 * at the run's end) get TB_EXIT_WAIT_MS to write their last points: no
 * heartbeat waits now, and a healthy but large network directory can
 * take longer than the 2 s a generation's end gives them. Whether one is
 * still left, inside a write or stdio: the exit must then not unwind
 * under it. */
#define TB_EXIT_WAIT_MS 30000
static int tboard_left(void) { return mt_tboard_wait_left(TB_EXIT_WAIT_MS) > 0; }

/* The node daemon: the config, then node.c's loop. */
static int run_node(const char *config_path, const char *const *overrides,
                    const char *const *job_sets) {
  mt_node_config cfg;
  mt_device_eager_modules(); /* a node's GPU ranks run collectives; before devices = auto's count */
  if (mt_node_config_load(&cfg, config_path, overrides)) {
    fprintf(stderr, "mtnlgd: config %s cannot run:\n%s\n", config_path, mt_errmsg());
    return 2;
  }
  mt_log_set_level(mt_log_parse_level(cfg.log_level));
  signal(SIGPIPE, SIG_IGN); /* a lost peer is an error return, not a signal */
  signal(SIGXFSZ, SIG_IGN); /* a file-size limit fails that write (EFBIG), not the daemon */
  int abandoned = 0;
  mt_node_opts no = {.config = &cfg,
                     .job_overrides = job_sets,
                     .config_path = config_path,
                     .abandoned = &abandoned};
  int code = mt_node_main(&no);
  if (tboard_left()) abandoned = 1;
  if (abandoned) { /* device threads blocked in a collective, or a TensorBoard writer still held by
                      its disk: do not unwind under them */
    fflush(stdout);
    fflush(stderr);
    _exit(code);
  }
  return code;
}

/* Every Gloo group holds a socket (and our dup of it) per peer for each
 * rank thread: the world group of MT-NLG's 4480 ranks is 8 x 4479 x 2
 * descriptors a daemon. The unit raises the limit (LimitNOFILE); started
 * any other way (a shell, Slurm, a container) the soft limit is often 1024,
 * so take the hard limit, as systemd's own services do. */
static void raise_fd_limit(void) {
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) || rl.rlim_cur == rl.rlim_max) return;
  rlim_t was = rl.rlim_cur;
  rl.rlim_cur = rl.rlim_max;
  if (setrlimit(RLIMIT_NOFILE, &rl))
    mt_log_warn("open files: cannot raise the soft limit from %llu to %llu: %s",
                (unsigned long long)was, (unsigned long long)rl.rlim_max, strerror(errno));
}

/* What the command line asked for; the strings point into argv. */
typedef struct cli_opts {
  const char *job_path;    /* --standalone */
  const char *config_path; /* --config */
  const char *devices, *export_path, *extra_presets, *store_dir;
  const char *overrides[MAX_OVERRIDES + 1]; /* --set, NULL-ended */
  const char *job_sets[MAX_OVERRIDES + 1];  /* --job-set, NULL-ended */
  int n_overrides, n_job_sets;
  int json, procs, proc_rank, comm_timeout_ms;
} cli_opts;

/* The command line into *o, each option checked on its own (--log-level
 * takes effect here, so that all that follows logs at it); what the job or
 * the node config says of them is for the modes to check. Returns -1 to go
 * on, else the status to exit with: 0 after --help or --version, 2 for a
 * command line at fault (said on stderr). */
static int parse_args(int argc, char **argv, cli_opts *o) {
  *o = (cli_opts){.devices = "cpu", .procs = 1};
  enum {
    OPT_SET = 256,
    OPT_DEVICES,
    OPT_EXPORT,
    OPT_PRESETS,
    OPT_LOG_FORMAT,
    OPT_LOG_LEVEL,
    OPT_VERSION,
    OPT_PROCS,
    OPT_PROC_RANK,
    OPT_STORE,
    OPT_COMM_TIMEOUT
  };
  static const struct option opts[] = {
      {"config", required_argument, NULL, 'c'},
      {"job-set", required_argument, NULL, 'j'},
      {"standalone", required_argument, NULL, 's'},
      {"set", required_argument, NULL, OPT_SET},
      {"devices", required_argument, NULL, OPT_DEVICES},
      {"export", required_argument, NULL, OPT_EXPORT},
      {"presets", required_argument, NULL, OPT_PRESETS},
      {"log-format", required_argument, NULL, OPT_LOG_FORMAT},
      {"log-level", required_argument, NULL, OPT_LOG_LEVEL},
      {"version", no_argument, NULL, OPT_VERSION},
      {"procs", required_argument, NULL, OPT_PROCS},
      {"proc-rank", required_argument, NULL, OPT_PROC_RANK},
      {"store", required_argument, NULL, OPT_STORE},
      {"comm-timeout-ms", required_argument, NULL, OPT_COMM_TIMEOUT},
      {"help", no_argument, NULL, 'h'},
      {0},
  };
  int c;
  while ((c = getopt_long(argc, argv, "s:c:h", opts, NULL)) != -1) {
    switch (c) {
    case 's': o->job_path = optarg; break;
    case 'c': o->config_path = optarg; break;
    case 'j':
      if (o->n_job_sets == MAX_OVERRIDES) {
        fprintf(stderr, "mtnlgd: more than %d --job-set options\n", MAX_OVERRIDES);
        return 2;
      }
      o->job_sets[o->n_job_sets++] = optarg;
      break;
    case OPT_SET:
      if (o->n_overrides == MAX_OVERRIDES) {
        fprintf(stderr, "mtnlgd: more than %d --set options\n", MAX_OVERRIDES);
        return 2;
      }
      o->overrides[o->n_overrides++] = optarg;
      break;
    case OPT_DEVICES: o->devices = optarg; break;
    case OPT_EXPORT: o->export_path = optarg; break;
    case OPT_PRESETS: o->extra_presets = optarg; break;
    case OPT_LOG_FORMAT:
      if (strcmp(optarg, "text") && strcmp(optarg, "json")) {
        fprintf(stderr, "mtnlgd: --log-format must be text or json, not \"%s\"\n", optarg);
        return 2;
      }
      o->json = !strcmp(optarg, "json");
      break;
    case OPT_LOG_LEVEL: {
      int level = mt_log_parse_level(optarg);
      if (level < 0) {
        fprintf(stderr, "mtnlgd: --log-level must be error, warn, info or debug\n");
        return 2;
      }
      mt_log_set_level(level);
      break;
    }
    case OPT_VERSION: printf("mtnlgd %s\n", MT_VERSION); return 0;
    case OPT_PROCS:
    case OPT_PROC_RANK:
    case OPT_COMM_TIMEOUT: {
      char *end;
      long v = strtol(optarg, &end, 10);
      if (*end || end == optarg || v < (c == OPT_PROCS ? 1 : 0) || v > 1000000000) {
        fprintf(stderr, "mtnlgd: %s \"%s\": want a whole number from %d to 1000000000\n",
                c == OPT_PROCS       ? "--procs"
                : c == OPT_PROC_RANK ? "--proc-rank"
                                     : "--comm-timeout-ms",
                optarg, c == OPT_PROCS ? 1 : 0);
        return 2;
      }
      if (c == OPT_PROCS)
        o->procs = (int)v;
      else if (c == OPT_PROC_RANK)
        o->proc_rank = (int)v;
      else
        o->comm_timeout_ms = (int)v;
      break;
    }
    case OPT_STORE: o->store_dir = optarg; break;
    case 'h': usage(stdout); return 0;
    default: usage(stderr); return 2;
    }
  }
  if (optind < argc) {
    fprintf(stderr, "mtnlgd: unexpected argument \"%s\"\n", argv[optind]);
    usage(stderr);
    return 2;
  }
  if (o->config_path && o->job_path) {
    fprintf(stderr, "mtnlgd: --config and --standalone exclude each other\n");
    return 2;
  }
  return -1;
}

/* The job --standalone names, found with --presets and changed by --set,
 * its unused keys warned about. -1 (said on stderr) for a job that cannot
 * run. */
static int load_job(const cli_opts *o, mt_job *job) {
  /* a directory named for presets that is not there is a typo, not "none" */
  if (o->extra_presets) {
    struct stat pst;
    const char *why = stat(o->extra_presets, &pst) ? strerror(errno)
                      : !S_ISDIR(pst.st_mode)      ? "not a directory"
                                                   : NULL;
    if (why) {
      fprintf(stderr, "mtnlgd: --presets %s: %s\n", o->extra_presets, why);
      return -1;
    }
  }
  const char *preset_dirs[MT_PRESET_DIRS_MAX];
  mt_job_preset_dirs(o->extra_presets, preset_dirs);

  if (mt_job_load(job, o->job_path, preset_dirs, o->overrides)) {
    fprintf(stderr, "mtnlgd: job %s cannot run:\n%s\n", o->job_path, mt_errmsg());
    return -1;
  }
  char unused[MT_JOB_UNUSED_MAX][256];
  for (int i = 0, k = mt_job_unused(job, unused); i < k; i++)
    mt_log_warn("job %s: %s", o->job_path, unused[i]);
  return 0;
}

/* The devices --devices gives this process's ranks: the spec as resolved
 * (auto's and cuda's choice in `resolved`), and for GPUs one per rank. */
typedef struct device_choice {
  const char *devices; /* the spec: the argument, or resolved */
  int gpu;             /* cuda:LIST; else CPU devices, one per rank */
  char resolved[64];
  char specs[256][16];   /* gpu: the GPUs listed */
  const char *list[256]; /* gpu: specs, for mt_local_opts.devices */
} device_choice;

/* --devices: cpu (a CPU device per rank), cpu:N (the same, N saying how
 * many: the node config's meaning), cuda:LIST (rank k of this process on
 * the k-th GPU listed), cuda (the first `here` GPUs), or auto. Checked
 * against the job's ranks (world, here of them in this process) before
 * anything is allocated: GPUs that are not there, fewer than the ranks, a
 * GPU group without NCCL, a cpu:N that is not the ranks. -1 (said on
 * stderr) when they cannot run the job. */
static int resolve_devices(device_choice *dc, const char *devices, const mt_job *job, int procs,
                           int world, int here) {
  const mt_parallel_spec *p = &job->parallel;
  /* list: NULL past the GPUs listed */
  *dc = (device_choice){0};
  if (world > 1) mt_device_eager_modules(); /* before the first CUDA call */
  if (!strcmp(devices, "auto") &&
      mt_device_resolve_auto(dc->resolved, sizeof dc->resolved, here) > 0)
    devices = dc->resolved;
  else if (!strcmp(devices, "cuda")) {
    snprintf(dc->resolved, sizeof dc->resolved, here > 1 ? "cuda:0-%d" : "cuda:0", here - 1);
    devices = dc->resolved;
  }
  dc->devices = devices;
  dc->gpu = !strncmp(devices, "cuda:", 5);
  if (dc->gpu) {
    int n = mt_parse_devices(devices, dc->specs, 256);
    if (n < 0) {
      fprintf(stderr, "mtnlgd: --devices: %s\n", mt_errmsg());
      return -1;
    }
    if (n < here) {
      fprintf(stderr,
              "mtnlgd: --devices %s names %d GPU%s; this process runs %d ranks (tp %d x pp %d x "
              "dp %d%s) and needs one each\n",
              devices, n, n == 1 ? "" : "s", here, p->tp, p->pp, p->dp_min,
              procs > 1 ? ", over --procs" : "");
      return -1;
    }
    for (int i = 0; i < n; i++) {
      size_t total, avail;
      if (mt_device_memory(dc->specs[i], &total, &avail)) {
        fprintf(stderr, "mtnlgd: --devices %s: %s\n", devices, mt_errmsg());
        return -1;
      }
      dc->list[i] = dc->specs[i];
    }
    if (!MT_HAVE_NCCL && world > 1) {
      fprintf(stderr,
              "mtnlgd: --devices %s: this build has no NCCL, and the job's %d ranks (tp %d x pp "
              "%d x dp %d) talk over it on GPUs; one rank runs (cuda:N), or install NCCL "
              "and rebuild (-Dnccl_dir=DIR names one)\n",
              devices, world, p->tp, p->pp, p->dp_min);
      return -1;
    }
  } else if (strcmp(devices, "cpu") &&
             (strncmp(devices, "cpu:", 4) || devices[4] < '0' || devices[4] > '9' ||
              strspn(devices + 4, "0123456789") != strlen(devices + 4))) {
    fprintf(stderr, "mtnlgd: --devices %s: want cpu, cpu:N, cuda, cuda:LIST (0-7 or 0,2) or auto\n",
            devices);
    return -1;
  } else if (strcmp(devices, "cpu")) {
    /* cpu:N counts devices, as node.devices does; the job sets the ranks
     * (unlike torchrun's --nproc-per-node), so an N that is not theirs was
     * taken and ignored: say where the ranks come from instead */
    char *end;
    errno = 0;
    long n = strtol(devices + 4, &end, 10);
    if (errno || n != here) {
      fprintf(stderr,
              "mtnlgd: --devices %s names %s CPU device%s; this process runs %d rank%s (tp %d x "
              "pp %d x dp %d%s), one device each: give --devices cpu (or cpu:%d), or set "
              "parallel.tp, parallel.pp and parallel.dp_min for the ranks you want\n",
              devices, devices + 4, n == 1 && !errno ? "" : "s", here, here == 1 ? "" : "s", p->tp,
              p->pp, p->dp_min, procs > 1 ? ", over --procs" : "", here);
      return -1;
    }
  }
  return 0;
}

/* Loads OpenBLAS now, so the kernel can be reported before the ranks
 * start, with the layout and the threads. -1 (logged) without it: this
 * machine cannot run the job, and a restart would only repeat that. */
static int report_start(const mt_job *job, int world, int here, const device_choice *dc) {
  mt_device probe;
  if (mt_device_open(&probe, "cpu:0")) {
    mt_log_error("%s", mt_errmsg());
    return -1;
  }
  mt_log_info("mtnlgd %s: job %s (%s), %d ranks (tp %d x pp %d x dp %d), %d of them on %s "
              "devices in this process, %d threads (OpenMP wait %s), OpenBLAS %s (%s) from %s",
              MT_VERSION, job->name, job->hash, world, job->parallel.tp, job->parallel.pp,
              job->parallel.dp_min, here, dc->gpu ? dc->devices : "cpu", probe.threads,
              mt_omp_wait_policy(), mt_blas_corename(), mt_blas_choice(), mt_blas_library());
  mt_device_close(&probe);
  return 0;
}

/* --standalone: the job on this machine alone (this process's share of its
 * ranks under --procs) until it ends or a signal stops it. Returns the exit
 * status usage() describes. */
static int run_standalone(const cli_opts *o) {
  mt_job job;
  if (load_job(o, &job)) return 2;
  int world = job.parallel.tp * job.parallel.pp * job.parallel.dp_min;
  int here = o->procs > 0 ? world / o->procs : world;
  device_choice dc;
  if (resolve_devices(&dc, o->devices, &job, o->procs, world, here)) return 2;
  /* the memory plan: a job that cannot fit is refused with the numbers
   * before anything is allocated */
  if (mt_check_memory_plan(&job, here, dc.gpu ? dc.specs[0] : "cpu:0")) {
    fprintf(stderr, "mtnlgd: job %s cannot run here:\n%s\n", o->job_path, mt_errmsg());
    return 2;
  }
  if (report_start(&job, world, here, &dc)) return 2; /* 2, not the 1 of a lost peer */

  if (o->procs > 1 && !o->store_dir) {
    fprintf(stderr, "mtnlgd: --procs %d needs --store DIR shared by the processes\n", o->procs);
    return 2;
  }
  if (o->proc_rank >= o->procs) {
    fprintf(stderr, "mtnlgd: --proc-rank %d is not below --procs %d\n", o->proc_rank, o->procs);
    return 2;
  }
  mt_store *store = NULL;
  if (o->store_dir && mt_store_file_new(o->store_dir, &store)) {
    fprintf(stderr, "mtnlgd: --store %s: %s\n", o->store_dir, mt_errmsg());
    return 2;
  }
  signal(SIGINT, on_signal);
  signal(SIGTERM, on_signal);
  signal(SIGPIPE, SIG_IGN); /* a lost peer is an error return, not a signal */
  signal(SIGXFSZ, SIG_IGN); /* a file-size limit fails that write (EFBIG), not the daemon */
  const char *export_path = o->export_path;
  if (!export_path && job.checkpoint.export_path[0]) export_path = job.checkpoint.export_path;
  step_printer printer = {.json = o->json,
                          .steps = job.train.steps,
                          .log_every = job.train.log_interval > 0 ? job.train.log_interval : 1,
                          .tboard = o->proc_rank == 0
                                        ? mt_tboard_new(job.train.tensorboard_dir,
                                                        job.train.log_timers_to_tensorboard,
                                                        job.train.log_memory_to_tensorboard)
                                        : NULL,
                          .gpus = dc.list};
  while (dc.gpu && printer.n_gpus < here && dc.list[printer.n_gpus]) printer.n_gpus++;
  mt_local_opts lo = {.job = &job,
                      .procs = o->procs,
                      .proc_rank = o->proc_rank,
                      .store = store,
                      .comm_timeout_ms = o->comm_timeout_ms,
                      .device_kind = "cpu",
                      .devices = dc.gpu ? dc.list : NULL,
                      .export_path = export_path,
                      .stop = &stop_requested,
                      .on_step = o->proc_rank == 0 ? on_step : NULL,
                      .on_eval = o->proc_rank == 0 ? on_eval : NULL,
                      .on_stopped = on_stopped,
                      .arg = &printer};
  int rc = mt_local_run(&lo);
  if (rc) mt_log_error("%s", mt_errmsg());
  mt_tboard_free(printer.tboard);
  mt_steplog_acc_free(&printer.acc);
  mt_store_free(store);
  /* the node daemon's convention: 1 for what another try may pass (a lost
   * peer process, a timed-out collective), which a supervisor restarts; 2
   * for the job's own fault (its data, a checkpoint of another model, a
   * stop or last step whose checkpoint failed: the steps since are lost),
   * which a restart would only repeat */
  if (rc) return mt_err_retryable(rc) ? 1 : 2;
  return printer.unsaved ? 2 : 0;
}

/* The command line, then the mode it names: the node daemon (--config) or
 * a job on this machine alone (--standalone). */
int main(int argc, char **argv) {
  cli_opts o;
  int code = parse_args(argc, argv, &o);
  if (code >= 0) return code;
  raise_fd_limit();
  if (o.job_path) {
    code = run_standalone(&o);
    if (tboard_left()) { /* a writer is still held: do not unwind under it */
      fflush(stdout);
      fflush(stderr);
      _exit(code);
    }
    return code;
  }
  if (!o.config_path) {
    fprintf(stderr, "mtnlgd: give --config FILE (the node daemon) or --standalone JOB.json\n");
    usage(stderr);
    return 2;
  }
  return run_node(o.config_path, o.overrides, o.job_sets);
}
