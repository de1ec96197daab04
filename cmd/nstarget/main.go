// Command nstarget serves iSCSI block storage to many tenants, each in its own network
// namespace, from one process.
//
// It owns: the command line (serve, check, demo, example, version), wiring conf → backend →
// target/scsi → target → netnsmux, signal handling and logging setup.
//
// It must never: hold protocol logic of its own, or serve a connection to any tenant but the
// one whose namespace it arrived in.
//
// The main goroutine stays on the process's first OS thread, which never enters a tenant
// namespace: importing netnsmux locks it there (golang/go#53210, netns-findings.md).
package main

import (
	"context"
	_ "embed"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"
	"syscall"
	"unsafe"

	"nstarget/conf"
	"nstarget/netnsmux"
	"nstarget/target"
)

// Exit codes.
const (
	exitOK    = 0
	exitFail  = 1 // invalid configuration or a runtime failure
	exitUsage = 2 // bad command line
)

//go:embed example.toml
var exampleConfig string

const usageText = `usage: nstarget <command> [flags]

commands:
  serve   -c FILE [-pprof 127.0.0.1:6060]
                    serve every tenant of FILE until SIGINT/SIGTERM; -pprof serves, in the
                    root namespace and unauthenticated (keep it on loopback), Go's profiler
                    at /debug/pprof/ and at /debug/usage the JSON of what is held now:
                    {"total":{…},"tenants":{"NAME":{…}},"process":{"fds","rss_bytes","threads"}}
                    with connections, sessions, commands and buffer_bytes per tenant
                    (/debug/usage?gc=1 first collects garbage and returns it to the OS)
          [-socket PATH]   the control socket (default: server.control_socket of FILE,
                    /run/nstarget/nstarget.sock): root only, for status
  check   -c FILE   validate FILE (and the volumes it names) without serving; exit 1 if invalid
  reload  [-socket PATH]
                    make serve re-read its file (as SIGHUP does) and apply only what changed:
                    tenants, portals, targets, allow-lists, CHAP, LUNs added or removed,
                    volumes grown, read_only, write_cache; a file that fails check, or changes
                    what needs a restart (server keys, limits, an alias), changes nothing: its
                    findings are printed and the exit code is 1
  status  [-socket PATH] [-o text|json] [TENANT]
                    ask a running serve for its tenants (state, portal, namespace id, what
                    each holds), their targets and LUNs (reservation holders), the pool's fill
                    level, and the sessions attached (initiator, ISID, TSIH, remote, since,
                    commands, bytes read and written)
  demo    [-exit]   three tenants with identical addresses and IQNs, real initiators, one process
  fleet create -prefix P -count N [-netns-dir DIR] [-config FILE] [-data-dir DIR] [-size S]
  fleet delete -prefix P [-netns-dir DIR]
                    make (or remove) namespaces P-0001 … P-NNNN in-process, each with its
                    loopback up (~0.6 ms each, no fork), and write a matching configuration
                    (one tenant per namespace on 127.0.0.1:3260)
  cluster apply -c FILE [-endpoints URL,...] [-prefix P] [-allow-empty]
                    validate FILE's tenants and publish them to the cluster's etcd
  cluster status [-endpoints URL,...] [-prefix P] [-o text|json]
                    the cluster's nodes and leases, and each tenant's owner and placement
  example           print an annotated configuration file
  version           print the build version

serve and check read /etc/nstarget/nstarget.toml when -c is not given.

common flags of serve and demo:
  -log-level debug|info|warn|error   (default info; demo: warn)
  -log-format text|json              (default text)

exit codes: 0 success (also after SIGINT/SIGTERM), 1 invalid config or failure, 2 usage error
`

type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, "nstarget: missing command\n"+usageText)
		return exitUsage
	}
	cmd, rest := args[0], args[1:]
	var err error
	switch cmd {
	case "serve":
		err = cmdServe(rest, stderr)
	case "check":
		err = cmdCheck(rest, stdout)
	case "status":
		err = cmdStatus(rest, stdout)
	case "reload":
		err = cmdReload(rest, stdout)
	case "fleet":
		err = cmdFleet(rest, stdout, stderr)
	case "cluster":
		return runCluster(rest, stdout, stderr)
	case "demo":
		err = cmdDemo(rest, stdout, stderr)
	case "example":
		err = noArgs("example", rest)
		if err == nil {
			fmt.Fprint(stdout, exampleConfig)
		}
	case "version":
		err = noArgs("version", rest)
		if err == nil {
			fmt.Fprintln(stdout, version())
		}
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usageText)
		return exitOK
	default:
		fmt.Fprintf(stderr, "nstarget: unknown command %q\n%s", cmd, usageText)
		return exitUsage
	}
	var ue usageError
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, errHelp):
		fmt.Fprint(stdout, usageText)
		return exitOK
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "nstarget %s: %s\nrun 'nstarget help' for usage\n", cmd, ue.msg)
		return exitUsage
	default:
		fmt.Fprintf(stderr, "nstarget %s: %v\n", cmd, err)
		return exitFail
	}
}

func noArgs(cmd string, args []string) error {
	if len(args) > 0 {
		return usageError{fmt.Sprintf("unexpected argument %q", args[0])}
	}
	return nil
}

// errHelp is a command's -h: run prints the usage and exits 0, like 'nstarget help'.
var errHelp = errors.New("help requested")

// parseFlags parses fs quietly and turns its complaints into usage errors that name the
// argument.
func parseFlags(fs *flag.FlagSet, args []string) error {
	fs.SetOutput(io.Discard)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return errHelp
		}
		return usageError{err.Error()}
	}
	if fs.NArg() > 0 {
		return usageError{fmt.Sprintf("unexpected argument %q", fs.Arg(0))}
	}
	return nil
}

type logFlags struct{ level, format string }

func (l *logFlags) register(fs *flag.FlagSet, level string) {
	fs.StringVar(&l.level, "log-level", level, "debug|info|warn|error")
	fs.StringVar(&l.format, "log-format", "text", "text|json")
}

func (l *logFlags) logger(w io.Writer) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(l.level)); err != nil {
		return nil, usageError{fmt.Sprintf("bad -log-level %q (debug, info, warn, error)", l.level)}
	}
	o := &slog.HandlerOptions{Level: lv}
	switch l.format {
	case "text":
		return slog.New(slog.NewTextHandler(w, o)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, o)), nil
	}
	return nil, usageError{fmt.Sprintf("bad -log-format %q (text, json)", l.format)}
}

// defaultConfig is where serve and check look without -c (the systemd unit relies on it).
const defaultConfig = "/etc/nstarget/nstarget.toml"

func configFlag(fs *flag.FlagSet) *string {
	return fs.String("c", defaultConfig, "configuration file")
}

func cmdCheck(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("check", flag.ContinueOnError)
	file := configFlag(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *file == "" {
		return usageError{"missing -c FILE"}
	}
	cfg, err := loadAndCheck(*file)
	if err != nil {
		return err
	}
	targets, luns := 0, 0
	for _, t := range cfg.Tenants {
		targets += len(t.Targets)
		for _, tg := range t.Targets {
			luns += len(tg.LUNs)
		}
	}
	fmt.Fprintf(stdout, "%s: ok: %d tenants, %d targets, %d LUNs; pool %s; namespaces in %s\n",
		*file, len(cfg.Tenants), targets, luns, cfg.Server.DataDir, cfg.Server.NetnsDir)
	return nil
}

// loadAndCheck validates the file and every volume against the pool, creating nothing.
func loadAndCheck(file string) (*conf.Config, error) {
	cfg, err := conf.Load(file)
	if err != nil {
		return nil, indentErrors(err)
	}
	if err := checkPool(cfg); err != nil {
		return nil, indentErrors(err)
	}
	return cfg, nil
}

// indentErrors puts each finding of a multi-error on its own line under the command's prefix.
func indentErrors(err error) error {
	var es conf.Errors
	if errors.As(err, &es) && len(es) > 1 {
		return fmt.Errorf("%d errors:\n  %s", len(es), strings.ReplaceAll(es.Error(), "\n", "\n  "))
	}
	return err
}

// madvPopulateWrite is Linux's MADV_POPULATE_WRITE (5.14+).
const madvPopulateWrite = 23

// startupMemoryLimit bounds the heap while the collector is off at start-up (startupGC); a
// lower GOMEMLIMIT wins.
const startupMemoryLimit = 512 << 20

// startupGC turns the garbage collector off, within startupMemoryLimit, and returns what turns
// it back to how it was (GOGC, GOMEMLIMIT); that is idempotent.
func startupGC() (restore func()) {
	limit := debug.SetMemoryLimit(-1)
	if limit > startupMemoryLimit {
		debug.SetMemoryLimit(startupMemoryLimit)
	}
	percent := debug.SetGCPercent(-1)
	var once sync.Once
	return func() {
		once.Do(func() {
			debug.SetGCPercent(percent)
			debug.SetMemoryLimit(limit)
		})
	}
}

// prefaultHeap gives the heap the memory start-up will use, with its pages already backed: a
// page fault costs ~18 µs of CPU on the VMs this runs on (measured on the 2-core PVM guest),
// populating a page with MADV_POPULATE_WRITE under 1 µs, and 1024 tenants took ~3700 fresh
// heap pages (16 MiB allocated by the time every tenant is built: ~85 bytes per byte of
// configuration). A buffer of 100 bytes per configuration byte (4 to 256 MiB) is populated,
// then freed by one collection while the heap is still small, and the allocations that follow
// reuse its pages (the collector is off meanwhile, so nothing hands them back to the OS):
// 1024 tenants, exec to every tenant built, 5300 page faults and 241 ms of CPU before, 1600
// and 206 ms with it. Without MADV_POPULATE_WRITE (before Linux 5.14) it does nothing.
func prefaultHeap(configBytes int) {
	if runtime.GOOS != "linux" {
		return
	}
	n := min(max(configBytes*100, 4<<20), 256<<20)
	b := make([]byte, n)
	if _, _, e := syscall.Syscall(syscall.SYS_MADVISE, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), madvPopulateWrite); e != 0 {
		return
	}
	runtime.KeepAlive(b)
	b = nil
	runtime.GC()
}

// isDir reports whether path is a directory.
func isDir(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.IsDir()
}

func cmdServe(args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	file := configFlag(fs)
	pprofAddr := fs.String("pprof", "", "serve net/http/pprof on this ip:port in the root namespace")
	sock := fs.String("socket", "", "control socket (default: server.control_socket of the file)")
	var lf logFlags
	lf.register(fs, "info")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *file == "" {
		return usageError{"missing -c FILE"}
	}
	log, err := lf.logger(stderr)
	if err != nil {
		return err
	}
	usage := &usageHandler{}
	if *pprofAddr != "" {
		ln, err := listenPprof(*pprofAddr, usage)
		if err != nil {
			return err
		}
		defer ln.Close()
		log.Info("pprof serving", "addr", ln.Addr().String())
	}
	// Start-up allocates a lot that stays (the configuration, the tenants' state) in a fresh
	// heap: collecting while the heap grows to its working size is work thrown away. The
	// collector is off (bounded by a memory limit) until every tenant is built.
	restoreGC := startupGC()
	defer restoreGC()
	// The volumes are checked by serve once it holds them (checking them here too would
	// cost a second pass over every volume at start-up).
	data, err := os.ReadFile(*file)
	if err != nil {
		return fmt.Errorf("read config: %w", err)
	}
	// The fd table is grown to its working size while the file is parsed: the growth waits
	// for an RCU grace period (netnsmux.ReserveFDs), and parsing opens no file that would
	// wait for it.
	nofile := raiseFDLimit(log)
	go netnsmux.ReserveFDs(0)
	// The tenants' listeners come up while the file is parsed, from a quick look at where
	// it says they listen (conf.PeekPortals, ~1 ms for 1024 tenants): parsing runs on this
	// thread, the namespaces are opened and the sockets made by the mux's workers on the
	// other CPU. serve reconciles them with what the parse says; a file that is refused
	// closes them again.
	var early *earlyMux
	if dir, portals, ok := conf.PeekPortals(*file, data); ok && len(portals) > 0 && isDir(dir) {
		// (Only into a directory that exists: a file that is then refused must not have
		// created one.)
		early = startEarlyMux(log, dir, portals)
		defer early.close()
	}
	prefaultHeap(len(data))
	cfg, err := conf.Parse(*file, data)
	if err != nil {
		return indentErrors(err)
	}
	if *sock != "" {
		cfg.Server.ControlSocket, cfg.Server.ControlSocketSet = *sock, true
	}
	ctl := newControl(cfg, log)
	if err := ctl.listen(); err != nil {
		return err
	}
	defer ctl.close()
	sd := newNotifier(log)
	// The readiness looks at every tenant's namespace (a stat each): done beside the bring-up
	// instead of before it; events wait for it (they come from the bring-up, well after).
	var ready *readiness
	readyMade := make(chan struct{})
	go func() {
		ready = newReadiness(cfg, sd.Ready)
		close(readyMade)
	}()
	readiness := func() *readiness {
		<-readyMade
		return ready
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		// After the first signal a second one kills the process the default way.
		<-ctx.Done()
		sd.Stopping()
		stop()
	}()
	// SIGHUP reloads the file, as `nstarget reload` does; its findings go to the log.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	go func() {
		for {
			select {
			case <-hup:
				svc := ctl.svc.Load()
				if svc == nil {
					log.Warn("SIGHUP before serving: ignored")
					continue
				}
				changes, err := svc.reload()
				if err != nil {
					log.Error("reload refused; the configuration in force is unchanged", "file", cfg.File, "err", err)
					continue
				}
				log.Info("reloaded", "file", cfg.File, "changes", len(changes))
			case <-ctx.Done():
				return
			}
		}
	}()
	exp := newExporter()
	if cfg.Server.Metrics != "" {
		stopMetrics, err := serveMetrics(ctx, cfg.Server.Metrics, exp, log)
		if err != nil {
			return err
		}
		defer stopMetrics()
	}
	onEvent := func(ev netnsmux.Event) { ctl.event(ev); readiness().event(ev); exp.event(ev) }
	onService := func(svc *service) {
		restoreGC()
		// systemd hears RELOADING=1 then READY=1 around every reload, however it came.
		svc.reloading, svc.reloaded = sd.Reloading, sd.Ready
		ctl.svc.Store(svc)
		if svc.pool != nil {
			exp.pool.Store(svc.pool)
		}
		readiness().started()
	}
	return serve(ctx, cfg, serveOptions{Logger: log, OnEvent: onEvent, OnService: onService, FDLimit: nofile, Early: early, OnMux: exp.mux.Store, OnServer: func(s *target.Server) {
		usage.srv.Store(s)
		ctl.srv.Store(s)
		exp.srv.Store(s)
	}})
}
