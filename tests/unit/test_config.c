/* test_config.c — the node config: defaults, INI, --set overrides, refusals. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "err.h"
#include "mt_check.h"

static char *write_tmp(const char *text) {
  static char path[64];
  snprintf(path, sizeof path, "/tmp/mt_test_config_XXXXXX");
  int fd = mkstemp(path);
  if (fd < 0) return NULL;
  if (write(fd, text, strlen(text)) != (ssize_t)strlen(text)) return NULL;
  close(fd);
  return path;
}

static void test_defaults_without_a_file(void) {
  mt_node_config c;
  CHECK(mt_node_config_load(&c, NULL, NULL) == 0, "mt_node_config_load(&c, NULL, NULL) == 0");
  CHECK(!strcmp(c.devices, "auto"), "!strcmp(c.devices, \"auto\")");
  CHECK(c.host == -1 && c.heartbeat_interval_ms == 1000 && c.heartbeat_timeout_ms == 6000,
        "c.host == -1 && c.heartbeat_interval_ms == 1000 && c.heartbeat_timeout_ms == 6000");
  CHECK(!strcmp(c.control_listen, "127.0.0.1:8470"),
        "!strcmp(c.control_listen, \"127.0.0.1:8470\")");
  CHECK(c.name[0] != 0, "c.name[0] != 0");
  CHECK(c.max_restarts == 3 && c.reform_timeout_s == 600,
        "c.max_restarts == 3 && c.reform_timeout_s == 600");
}

static void test_file_then_overrides_win(void) {
  char *p = write_tmp("# comment\n[node]\nname = a1\ndevices = cpu:4\n"
                      "[rendezvous]\nendpoint = 10.0.0.1:29500\nhost = no\n"
                      "[cluster]\nheartbeat_interval_ms = 500\n");
  const char *ov[] = {"node.devices=cuda:0-7", "rendezvous.host=yes", "rendezvous.max_restarts=0",
                      "rendezvous.reform_timeout_s=5", NULL};
  mt_node_config c;
  CHECK(mt_node_config_load(&c, p, ov) == 0, "mt_node_config_load(&c, p, ov) == 0");
  CHECK(c.max_restarts == 0 && c.reform_timeout_s == 5,
        "c.max_restarts == 0 && c.reform_timeout_s == 5");
  CHECK(!strcmp(c.name, "a1") && !strcmp(c.devices, "cuda:0-7") && c.host == 1,
        "!strcmp(c.name, \"a1\") && !strcmp(c.devices, \"cuda:0-7\") && c.host == 1");
  CHECK(!strcmp(c.endpoint, "10.0.0.1:29500") && c.heartbeat_interval_ms == 500,
        "!strcmp(c.endpoint, \"10.0.0.1:29500\") && c.heartbeat_interval_ms == 500");
  unlink(p);
}

static void test_every_problem_named_with_its_line(void) {
  char *p = write_tmp("[node]\nname = ok\ncolour = blue\n[nosuch]\nx = 1\n"
                      "[cluster]\nheartbeat_interval_ms = fast\n");
  const char *ov[] = {"rendezvous.endpoint=nohostport", "bad-override", NULL};
  mt_node_config c;
  CHECK(mt_node_config_load(&c, p, ov) == MT_EINVAL, "mt_node_config_load(&c, p, ov) == MT_EINVAL");
  const char *m = mt_errmsg();
  CHECK(strstr(m, ":3: node.colour: unknown key") != NULL,
        "strstr(m, \":3: node.colour: unknown key\") != NULL");
  CHECK(strstr(m, ":5: unknown section [nosuch]") != NULL,
        "strstr(m, \":5: unknown section [nosuch]\") != NULL");
  CHECK(strstr(m, ":7: cluster.heartbeat_interval_ms: \"fast\" is not an integer") != NULL,
        "strstr(m, \":7: cluster.heartbeat_interval_ms: \\\"fast\\\" is not an integer\") != NULL");
  CHECK(strstr(m, "--set bad-override: expected SECTION.KEY=VALUE") != NULL,
        "strstr(m, \"--set bad-override: expected SECTION.KEY=VALUE\") != NULL");
  unlink(p);
}

static void test_cross_key_checks(void) {
  const char *ov[] = {"rendezvous.endpoint=127.0.0.1:0", "node.devices=gpu:3",
                      "cluster.heartbeat_timeout_ms=1500", "log.format=xml", NULL};
  mt_node_config c;
  CHECK(mt_node_config_load(&c, NULL, ov) == MT_EINVAL,
        "mt_node_config_load(&c, NULL, ov) == MT_EINVAL");
  const char *m = mt_errmsg();
  CHECK(strstr(m, "rendezvous.endpoint") && strstr(m, "port must be set"),
        "strstr(m, \"rendezvous.endpoint\") && strstr(m, \"port must be set\")");
  CHECK(strstr(m, "node.devices") && strstr(m, "kind must be cpu or cuda"),
        "strstr(m, \"node.devices\") && strstr(m, \"kind must be cpu or cuda\")");
  CHECK(strstr(m, "cluster.heartbeat_timeout_ms: 1500 is under twice"),
        "strstr(m, \"cluster.heartbeat_timeout_ms: 1500 is under twice\")");
  CHECK(strstr(m, "log.format"), "strstr(m, \"log.format\")");
}

/* One run names every problem: a value refused on its own does not hide
 * the checks of the other keys, and is not judged again by its default. */
static void test_reads_need_token_without_token_file_is_refused_naming_both(void) {
  const char *ov[] = {"control.reads_need_token=yes", NULL};
  mt_node_config c;
  CHECK(mt_node_config_load(&c, NULL, ov) == MT_EINVAL, "refused");
  const char *m = mt_errmsg();
  CHECK(strstr(m, "control.reads_need_token") && strstr(m, "control.token_file"), "%s", m);
  const char *ok[] = {"control.reads_need_token=yes", "control.token_file=/etc/mtnlg/token", NULL};
  CHECK(mt_node_config_load(&c, NULL, ok) == 0, "with a token file: %s", mt_errmsg());
}

static void test_refused_values_do_not_hide_other_checks(void) {
  const char *ov[] = {"node.devices=gpu:2",
                      "control.listen=foo",
                      "cluster.heartbeat_interval_ms=5000",
                      "cluster.heartbeat_timeout_ms=abc",
                      "log.bogus=1",
                      NULL};
  mt_node_config c;
  CHECK(mt_node_config_load(&c, NULL, ov) == MT_EINVAL, "refused");
  const char *m = mt_errmsg();
  CHECK(strstr(m, "node.devices: devices \"gpu:2\": kind must be cpu or cuda"), "devices: %s", m);
  CHECK(strstr(m, "control.listen: \"foo\""), "listen: %s", m);
  CHECK(strstr(m, "cluster.heartbeat_timeout_ms: \"abc\" is not an integer"), "timeout: %s", m);
  CHECK(strstr(m, "log.bogus: unknown key"), "unknown key: %s", m);
  CHECK(!strstr(m, "is under twice"), "the refused timeout's default judged: %s", m);
}

static void test_device_lists(void) {
  char s[64][16];
  CHECK(mt_parse_devices("cpu:3", s, 64) == 3 && !strcmp(s[2], "cpu:2"),
        "mt_parse_devices(\"cpu:3\", s, 64) == 3 && !strcmp(s[2], \"cpu:2\")");
  CHECK(mt_parse_devices("cuda:0-7", s, 64) == 8 && !strcmp(s[7], "cuda:7"),
        "mt_parse_devices(\"cuda:0-7\", s, 64) == 8 && !strcmp(s[7], \"cuda:7\")");
  CHECK(mt_parse_devices("cuda:0,2,5-6", s, 64) == 4 && !strcmp(s[3], "cuda:6"),
        "mt_parse_devices(\"cuda:0,2,5-6\", s, 64) == 4 && !strcmp(s[3], \"cuda:6\")");
  CHECK(mt_parse_devices("cuda:3-1", s, 64) == MT_EINVAL,
        "mt_parse_devices(\"cuda:3-1\", s, 64) == MT_EINVAL");
  CHECK(mt_parse_devices("cpu:0", s, 64) == MT_EINVAL,
        "mt_parse_devices(\"cpu:0\", s, 64) == MT_EINVAL");
  CHECK(mt_parse_devices("cpu", s, 64) == MT_EINVAL,
        "mt_parse_devices(\"cpu\", s, 64) == MT_EINVAL");
}

static void test_host_port(void) {
  char h[64];
  int port;
  CHECK(mt_parse_host_port("127.0.0.1:29400", h, sizeof h, &port) == 0 && port == 29400 &&
            !strcmp(h, "127.0.0.1"),
        "127.0.0.1:29400 parses");
  CHECK(mt_parse_host_port("[::1]:80", h, sizeof h, &port) == 0 && !strcmp(h, "::1"),
        "mt_parse_host_port(\"[::1]:80\", h, sizeof h, &port) == 0 && !strcmp(h, \"::1\")");
  CHECK(mt_parse_host_port("host:99999", h, sizeof h, &port) == MT_EINVAL,
        "mt_parse_host_port(\"host:99999\", h, sizeof h, &port) == MT_EINVAL");
  CHECK(mt_parse_host_port(":80", h, sizeof h, &port) == MT_EINVAL,
        "mt_parse_host_port(\":80\", h, sizeof h, &port) == MT_EINVAL");
}

static void test_shipped_config_loads(void) {
  mt_node_config c;
  int rc = mt_node_config_load(&c, MT_ETC_DIR "/mtnlgd.conf", NULL);
  if (rc) fprintf(stderr, "%s\n", mt_errmsg());
  CHECK(rc == 0, "rc == 0");
}

/* A key given twice (here through a repeated section) is refused naming both
 * lines, not decided silently by the last; a line too long for the INI
 * reader is named by its own number (it used to be cut, and its rest read as
 * the next line); a directory is not a config. */
static void test_twice_long_lines_and_directories_refused(void) {
  char text[1024];
  char path[400];
  memset(path, 'p', sizeof path - 1);
  path[sizeof path - 1] = 0;
  snprintf(text, sizeof text,
           "[node]\ndevices = cuda:0\n[cluster]\nheartbeat_interval_ms = 500\n[node]\n"
           "devices = cpu:1\n[paths]\nstate_dir = /%s\n[log]\nlevel = info\n",
           path);
  char *p = write_tmp(text);
  mt_node_config c;
  CHECK(mt_node_config_load(&c, p, NULL) == MT_EINVAL, "a key twice and a long line: accepted");
  const char *m = mt_errmsg();
  CHECK(strstr(m, ":6: node.devices is given twice (first at line 2)"), "twice: %s", m);
  CHECK(strstr(m, ":8: the line is over") && !strstr(m, ":9:"), "the long line: %s", m);
  unlink(p);
  CHECK(mt_node_config_load(&c, "/tmp", NULL) == MT_EINVAL &&
            strstr(mt_errmsg(), "/tmp: a directory, not a config file"),
        "a directory as the config: %s", mt_errmsg());
}

/* A relative path in the file is the file's directory's, not the working
 * directory's (/ under systemd): a job.json beside mtnlgd.conf is found
 * however the daemon was started. One given with --set is the shell's, as
 * any argument's; one in a config without a directory (a pipe) is refused. */
static void test_relative_paths_are_the_config_files_directorys(void) {
  char dir[64] = "/tmp/mt_test_config_dir_XXXXXX";
  CHECK(mkdtemp(dir) != NULL, "mkdtemp");
  char conf[128], want[256], cwd[4096];
  snprintf(conf, sizeof conf, "%s/mtnlgd.conf", dir);
  FILE *f = fopen(conf, "w");
  CHECK(f != NULL, "fopen %s", conf);
  if (!f) return;
  fputs("[job]\npath = job.json\npresets = ./presets\n[control]\ntoken_file = secret/token\n"
        "[rendezvous]\nkey_file = /etc/mtnlg/cluster.key\n[paths]\nstate_dir = ../state\n",
        f);
  fclose(f);
  mt_node_config c;
  const char *ov[] = {"paths.checkpoint_dir=ckpt", NULL};
  /* named relative to the working directory too, which the result must not depend on */
  CHECK(getcwd(cwd, sizeof cwd) && chdir(dir) == 0, "chdir %s", dir);
  int rc = mt_node_config_load(&c, "mtnlgd.conf", ov);
  CHECK(chdir(cwd) == 0, "chdir back");
  CHECK(rc == 0, "relative paths: %s", mt_errmsg());
  snprintf(want, sizeof want, "%s/job.json", dir);
  CHECK(!strcmp(c.job_path, want), "job.path %s, want %s", c.job_path, want);
  snprintf(want, sizeof want, "%s/./presets", dir);
  CHECK(!strcmp(c.presets_dir, want), "job.presets %s, want %s", c.presets_dir, want);
  snprintf(want, sizeof want, "%s/secret/token", dir);
  CHECK(!strcmp(c.token_file, want), "control.token_file %s, want %s", c.token_file, want);
  snprintf(want, sizeof want, "%s/../state", dir);
  CHECK(!strcmp(c.state_dir, want), "paths.state_dir %s, want %s", c.state_dir, want);
  CHECK(!strcmp(c.key_file, "/etc/mtnlg/cluster.key"), "an absolute path kept: %s", c.key_file);
  CHECK(!strcmp(c.checkpoint_dir, "ckpt"), "--set's relative path kept: %s", c.checkpoint_dir);
  unlink(conf);
  rmdir(dir);
  /* a pipe (<(...)) has no directory: a relative path in it is refused */
  int fds[2];
  CHECK(pipe(fds) == 0, "pipe");
  const char *text = "[job]\npath = job.json\n";
  CHECK(write(fds[1], text, strlen(text)) == (ssize_t)strlen(text), "write");
  close(fds[1]);
  char via[64];
  snprintf(via, sizeof via, "/proc/self/fd/%d", fds[0]);
  rc = mt_node_config_load(&c, via, NULL);
  CHECK(rc == MT_EINVAL && strstr(mt_errmsg(), ":2: job.path: \"job.json\" is a relative path") &&
            strstr(mt_errmsg(), "give an absolute path"),
        "a relative path in a pipe: %d %s", rc, mt_errmsg());
  close(fds[0]);
  /* nor does a file read through a descriptor (/dev/stdin redirected from
   * it): /proc/self/fd is no directory of its relative paths */
  f = tmpfile();
  CHECK(f && fputs(text, f) >= 0 && fflush(f) == 0 && fseek(f, 0, SEEK_SET) == 0, "tmpfile");
  snprintf(via, sizeof via, "/proc/self/fd/%d", fileno(f));
  rc = mt_node_config_load(&c, via, NULL);
  CHECK(rc == MT_EINVAL && strstr(mt_errmsg(), "give an absolute path"),
        "a relative path in a file read as a descriptor: %d %s", rc, mt_errmsg());
  fclose(f);
}

/* rendezvous.etcd: the keys read, the prefix's default, and what cannot
 * work refused: a wildcard endpoint (the others dial the elected node's), a
 * prefix that does not end a path, a user without a password file. Without
 * etcd the endpoint may be a wildcard (the hosting node binds it). */
static void test_etcd_keys(void) {
  mt_node_config c;
  const char *ok[] = {"rendezvous.etcd=http://10.0.0.1:2379,http://10.0.0.2:2379",
                      "rendezvous.endpoint=10.0.0.7:29400", "rendezvous.etcd_user=mtnlg",
                      "rendezvous.etcd_password_file=/etc/mtnlg/etcd.password", NULL};
  int rc = mt_node_config_load(&c, NULL, ok);
  CHECK(!rc && !strcmp(c.etcd, "http://10.0.0.1:2379,http://10.0.0.2:2379") &&
            !strcmp(c.etcd_prefix, "/mtnlg/") && !strcmp(c.etcd_user, "mtnlg") &&
            !strcmp(c.etcd_password_file, "/etc/mtnlg/etcd.password"),
        "etcd keys: %s (prefix \"%s\")", rc ? mt_errmsg() : "read", c.etcd_prefix);
  const char *bad[] = {"rendezvous.etcd=http://10.0.0.1:2379", "rendezvous.endpoint=0.0.0.0:29400",
                       "rendezvous.etcd_prefix=/mtnlg", "rendezvous.etcd_user=mtnlg", NULL};
  CHECK(mt_node_config_load(&c, NULL, bad) == MT_EINVAL, "a config that cannot use etcd loaded");
  const char *m = mt_errmsg();
  CHECK(strstr(m, "rendezvous.endpoint: \"0.0.0.0:29400\": with rendezvous.etcd") &&
            strstr(m, "rendezvous.etcd_prefix: \"/mtnlg\": must end with '/'") &&
            strstr(m, "rendezvous.etcd_user is set but rendezvous.etcd_password_file is not"),
        "etcd refusals: %s", m);
  const char *tls[] = {"rendezvous.etcd=https://10.0.0.1:2379",
                       "rendezvous.endpoint=10.0.0.7:1",
                       "rendezvous.etcd_cacert=/etc/mtnlg/etcd-ca.pem",
                       "rendezvous.etcd_cert=/etc/mtnlg/etcd-client.pem",
                       "rendezvous.etcd_key=/etc/mtnlg/etcd-client.key",
                       NULL};
  rc = mt_node_config_load(&c, NULL, tls);
  CHECK(!rc && !strcmp(c.etcd_cert, "/etc/mtnlg/etcd-client.pem") &&
            !strcmp(c.etcd_key, "/etc/mtnlg/etcd-client.key"),
        "etcd's client certificate: %s", rc ? mt_errmsg() : "read");
  const char *half[] = {"rendezvous.etcd=http://10.0.0.1:2379", "rendezvous.endpoint=10.0.0.7:1",
                        "rendezvous.etcd_cert=/etc/mtnlg/etcd-client.pem", NULL};
  CHECK(mt_node_config_load(&c, NULL, half) == MT_EINVAL, "a certificate without its key loaded");
  m = mt_errmsg();
  CHECK(strstr(m, "rendezvous.etcd_cert is set but rendezvous.etcd_key is not") &&
            strstr(m, "rendezvous.etcd_cert is set but rendezvous.etcd \"http://10.0.0.1:2379\" "
                      "is not https://"),
        "etcd certificate refusals: %s", m);
  const char *wild[] = {"rendezvous.endpoint=0.0.0.0:29400", NULL};
  CHECK(!mt_node_config_load(&c, NULL, wild), "a wildcard endpoint without etcd: %s", mt_errmsg());
}

int main(void) {
  test_defaults_without_a_file();
  test_etcd_keys();
  test_twice_long_lines_and_directories_refused();
  test_file_then_overrides_win();
  test_every_problem_named_with_its_line();
  test_cross_key_checks();
  test_reads_need_token_without_token_file_is_refused_naming_both();
  test_refused_values_do_not_hide_other_checks();
  test_device_lists();
  test_host_port();
  test_shipped_config_loads();
  test_relative_paths_are_the_config_files_directorys();
  if (failures) fprintf(stderr, "test_config: %d failure(s)\n", failures);
  return failures != 0;
}
