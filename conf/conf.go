// Package conf reads and validates the nstarget TOML configuration: the server section, the
// tenants, their targets and LUNs. Every error names the file, the line and the key.
//
// It owns: the file format (keys, defaults, units), validation of names, sizes and addresses,
// and mapping each finding to a file:line.
//
// It must never: touch the volume pool or the network (the shrink check goes through a function
// the caller passes; volume names are checked with backend.ValidName and iSCSI names with
// iscsiname.Check, the pure rules of the packages that own those names), or silently ignore a
// key it does not know.
package conf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/BurntSushi/toml"

	"nstarget/backend"
	"nstarget/target/chap"
	"nstarget/target/iscsiname"
	"nstarget/tenantnet"
)

// Defaults of the [server] and [[tenant]] sections.
const (
	DefaultNetnsDir = "/run/netns"
	DefaultDataDir  = "/var/lib/nstarget"
	DefaultPortal   = "0.0.0.0:3260"
	// MaxLUN is the largest LUN number the flat addressing method can carry (SAM-5).
	MaxLUN = 16383
)

// Config is a validated configuration.
type Config struct {
	File    string // path it was read from, for messages
	Server  Server
	Tenants []*Tenant
	// Cluster is [cluster]: nil for a node of its own, whose tenants are the file's.
	Cluster *Cluster
	// pos gives the line of any key, for findings made after Parse (CheckVolumes).
	pos *lazyPositions
}

// Server is the [server] section.
type Server struct {
	NetnsDir string // absolute; where tenant namespaces appear
	DataDir  string // absolute; the shared volume pool (relative paths are relative to the file)
	// DataDirLine is the line of data_dir (0: defaulted), for errors about the pool itself.
	DataDirLine int
	// MaxBuffer bounds data buffers of all tenants together, in bytes; default
	// DefaultMaxBuffer.
	MaxBuffer int64
	// MaxConnections bounds open connections of all tenants together; 0 (the default) lets
	// serve derive it from RLIMIT_NOFILE.
	MaxConnections int
	// NopInterval is the idle time before the target pings a connection; NopTimeout closes
	// a connection that makes no progress for that long after a ping.
	NopInterval, NopTimeout time.Duration
	// Limits is [server.limits] with DefaultLimits filled in: what a tenant may hold unless
	// its own [tenant.limits] says otherwise.
	Limits Limits
	// FairShare holds a tenant that sends far more than the other busy tenants to about its
	// weighted share; default true.
	FairShare bool
	// ControlSocket is the root-only unix socket of status and reload (absolute path);
	// ControlSocketSet says the file named it rather than leaving the default.
	ControlSocket    string
	ControlSocketSet bool
	// Metrics is the ip:port of the Prometheus exporter in the root namespace; "" is off.
	Metrics string
	// PoolSoftThreshold is the pool fill level, in percent, above which every session is told
	// THIN PROVISIONING SOFT THRESHOLD REACHED and a warning is logged; 0 is off.
	PoolSoftThreshold int
	// Backend is where volumes live: BackendFile (data_dir) or BackendRBD (RBD); BackendLine
	// is the line of server.backend (0: defaulted).
	Backend     string
	BackendLine int
	RBD         RBD
}

// Tenant is one [[tenant]].
type Tenant struct {
	Name    string
	Netns   string // file name under NetnsDir; default Name
	Portal  string // ip:port inside the namespace; default DefaultPortal
	Targets []*Target
	// Limits is resolved: each key of [tenant.limits], else of [server.limits], else
	// DefaultLimits.
	Limits Limits
	// DiscoveryCHAP is [tenant.discovery_chap]: what discovery sessions must prove; nil:
	// discovery is open to the tenant's network.
	DiscoveryCHAP *chap.Credentials
	// Network is [tenant.network]: the network a cluster node makes for the tenant when it
	// takes it over; nil: the namespace is made by someone else.
	Network *tenantnet.Spec
	Line    int
	// netnsSet: the file gives netns (else it is the name).
	netnsSet bool
}

// Target is one [[tenant.target]].
type Target struct {
	IQN        string
	Alias      string
	Initiators []string // empty: any initiator of the tenant
	// CHAP is [tenant.target.chap]: what an initiator must prove to log in; nil: nothing.
	CHAP *chap.Credentials
	LUNs []*LUN
	Line int
}

// LUN is one [[tenant.target.lun]].
type LUN struct {
	ID       uint64
	Volume   string
	Size     int64 // bytes, a positive multiple of 512
	ReadOnly bool
	// WriteCache reports a volatile write cache to the initiator and relies on its flushes
	// (SYNCHRONIZE CACHE, FUA); false syncs every write before completing it. Default true.
	WriteCache bool
	Line       int // of the [[tenant.target.lun]] header
	sizeKey    string
	idSet      bool // the file gives id (else it is the LUN's position)
}

// Error is one finding, located in the file.
type Error struct {
	File string
	Line int    // 0 when unknown
	Key  string // indexed key path, e.g. tenant[1].target[0].iqn
	Msg  string
	Err  error // the underlying cause, if any
}

func (e *Error) Error() string {
	loc := e.File
	if e.Line > 0 {
		loc += ":" + strconv.Itoa(e.Line)
	}
	if e.Key != "" {
		return loc + ": " + e.Key + ": " + e.Msg
	}
	return loc + ": " + e.Msg
}

func (e *Error) Unwrap() error { return e.Err }

// Errors is every finding of one validation, in file order.
type Errors []*Error

func (es Errors) Error() string {
	s := make([]string, len(es))
	for i, e := range es {
		s[i] = e.Error()
	}
	return strings.Join(s, "\n")
}

// Unwrap lets errors.Is/As see each finding.
func (es Errors) Unwrap() []error {
	out := make([]error, len(es))
	for i, e := range es {
		out[i] = e
	}
	return out
}

// Load reads and validates a configuration file. It touches nothing but the file.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	return Parse(path, data)
}

// Parse validates a configuration held in memory; file names it in messages and anchors
// relative paths (its directory).
func Parse(file string, data []byte) (*Config, error) {
	doc := string(data)
	var raw map[string]any
	if _, err := toml.Decode(doc, &raw); err != nil {
		var pe toml.ParseError
		if errors.As(err, &pe) {
			msg := "syntax: " + pe.Message
			if isSecretKey(pe.LastKey) {
				// The parser quotes what it found, which here is (part of) a secret; the
				// underlying error is dropped for the same reason.
				return nil, Errors{{File: file, Line: pe.Position.Line, Key: pe.LastKey, Msg: "syntax error in a secret's value (not shown); quote it as a TOML string"}}
			}
			return nil, Errors{{File: file, Line: pe.Position.Line, Key: pe.LastKey, Msg: msg, Err: err}}
		}
		return nil, Errors{{File: file, Msg: err.Error(), Err: err}}
	}
	// Only the lines of table headers (and of a few keys outside [[tenant]]) are part of the
	// configuration; the line of every other key is needed only for a finding, so that
	// (costlier) scan waits for the first one.
	v := &validator{file: file, lines: scanLines(doc), pos: &lazyPositions{doc: doc}}
	cfg := v.config(raw)
	v.crossCheck(cfg)
	if len(v.errs) > 0 {
		sort.SliceStable(v.errs, func(i, j int) bool { return v.errs[i].Line < v.errs[j].Line })
		return nil, v.errs
	}
	return cfg, nil
}

// DataDirError locates a failure of the pool directory itself (cannot be created, not a
// directory) at the data_dir key, or at the file when data_dir was defaulted.
func (c *Config) DataDirError(err error) error {
	return Errors{{File: c.File, Line: c.Server.DataDirLine, Key: "server.data_dir", Msg: err.Error(), Err: err}}
}

// CheckVolumes runs check (normally backend.Pool.Check) on every LUN's volume and reports
// failures at the LUN's size key: an existing volume larger than the configured size.
func (c *Config) CheckVolumes(check func(name string, size int64) error) error {
	var errs Errors
	for _, t := range c.Tenants {
		for _, tg := range t.Targets {
			for _, l := range tg.LUNs {
				if err := check(l.Volume, l.Size); err != nil {
					errs = append(errs, &Error{File: c.File, Line: c.line(l.sizeKey), Key: l.sizeKey,
						Msg: err.Error(), Err: err})
				}
			}
		}
	}
	if len(errs) > 0 {
		return errs
	}
	return nil
}

// line is the line of key in the file the configuration was read from (0: unknown).
func (c *Config) line(key string) int {
	if c.pos == nil {
		return 0
	}
	return c.pos.get().line(key)
}

// lazyPositions scans a document for the line of every key on first use.
type lazyPositions struct {
	doc  string
	once sync.Once
	p    positions
}

func (l *lazyPositions) get() positions {
	l.once.Do(func() {
		l.p = scanPositions(l.doc)
		l.doc = ""
	})
	return l.p
}

type validator struct {
	file string
	// lines has the lines of table headers and of keys outside arrays of tables (scanLines):
	// what Line fields need. pos has every key's, scanned on the first finding.
	lines positions
	pos   *lazyPositions
	errs  Errors
}

func (v *validator) errorf(key string, format string, args ...any) {
	v.errs = append(v.errs, &Error{File: v.file, Line: v.pos.get().line(key), Key: key, Msg: fmt.Sprintf(format, args...)})
}

// table is one TOML table being read: every key read is marked, the rest are unknown.
type table struct {
	v    *validator
	path string
	m    map[string]any
	used []string // keys read (a table has a handful: a slice beats a map per table)
}

func (v *validator) table(path string, m map[string]any) *table {
	return &table{v: v, path: path, m: m, used: make([]string, 0, len(m))}
}

func (t *table) key(k string) string {
	if t.path == "" {
		return k
	}
	return t.path + "." + k
}

func (t *table) get(k string) (any, bool) {
	if !slices.Contains(t.used, k) {
		t.used = append(t.used, k)
	}
	x, ok := t.m[k]
	return x, ok
}

func (t *table) str(k, def string, required bool) string {
	x, ok := t.get(k)
	if !ok {
		if required {
			t.v.errorf(t.path, "missing required key %q", k)
		}
		return def
	}
	s, ok := x.(string)
	if !ok {
		t.v.errorf(t.key(k), "must be a string, not %s", tomlType(x))
		return def
	}
	return s
}

func (t *table) boolean(k string, def bool) bool {
	x, ok := t.get(k)
	if !ok {
		return def
	}
	b, ok := x.(bool)
	if !ok {
		t.v.errorf(t.key(k), "must be true or false, not %s", tomlType(x))
		return def
	}
	return b
}

func (t *table) strings(k string) []string {
	x, ok := t.get(k)
	if !ok {
		return nil
	}
	arr, ok := x.([]any)
	if !ok {
		t.v.errorf(t.key(k), "must be an array of strings, not %s", tomlType(x))
		return nil
	}
	out := make([]string, 0, len(arr))
	for i, e := range arr {
		s, ok := e.(string)
		if !ok {
			t.v.errorf(t.key(k), "element %d must be a string, not %s", i, tomlType(e))
			continue
		}
		out = append(out, s)
	}
	return out
}

// sub returns the table k ([k] or an inline table), or nil when it is absent or not a table
// (which is reported).
func (t *table) sub(k string) *table {
	x, ok := t.get(k)
	if !ok {
		return nil
	}
	m, ok := x.(map[string]any)
	if !ok {
		t.v.errorf(t.key(k), "must be a table, not %s", tomlType(x))
		return nil
	}
	return t.v.table(t.key(k), m)
}

// tables returns an array of tables (either [[k]] sections or an inline array of tables).
func (t *table) tables(k string) []*table {
	x, ok := t.get(k)
	if !ok {
		return nil
	}
	var ms []map[string]any
	switch a := x.(type) {
	case []map[string]any:
		ms = a
	case []any:
		for i, e := range a {
			m, ok := e.(map[string]any)
			if !ok {
				t.v.errorf(t.key(k), "element %d must be a table, not %s", i, tomlType(e))
				continue
			}
			ms = append(ms, m)
		}
	default:
		t.v.errorf(t.key(k), "must be an array of tables ([[%s]]), not %s", t.key(k), tomlType(x))
		return nil
	}
	out := make([]*table, len(ms))
	base := t.key(k) + "["
	for i, m := range ms {
		out[i] = t.v.table(base+strconv.Itoa(i)+"]", m)
	}
	return out
}

// done reports every key of the table that was not read.
func (t *table) done() {
	var unknown []string
	for k := range t.m {
		if !slices.Contains(t.used, k) {
			unknown = append(unknown, k)
		}
	}
	sort.Strings(unknown)
	for _, k := range unknown {
		t.v.errorf(t.key(k), "unknown key")
	}
}

func tomlType(x any) string {
	switch x.(type) {
	case string:
		return "a string"
	case int64:
		return "an integer"
	case float64:
		return "a float"
	case bool:
		return "a boolean"
	case []any, []map[string]any:
		return "an array"
	case map[string]any:
		return "a table"
	}
	return fmt.Sprintf("a %T", x)
}

func (v *validator) config(raw map[string]any) *Config {
	root := v.table("", raw)
	cfg := &Config{File: v.file, Server: defaultServer(), pos: v.pos}
	if st := root.sub("server"); st != nil {
		cfg.Server.NetnsDir = v.dir(st, "netns_dir", DefaultNetnsDir)
		cfg.Server.DataDir = v.dir(st, "data_dir", DefaultDataDir)
		cfg.Server.DataDirLine = v.lines.line("server.data_dir")
		v.serverRuntime(st, &cfg.Server)
		v.backendKeys(st, &cfg.Server)
		st.done()
	}
	if ct := root.sub("cluster"); ct != nil {
		cfg.Cluster = v.cluster(ct, &cfg.Server)
	}
	for _, tt := range root.tables("tenant") {
		cfg.Tenants = append(cfg.Tenants, v.tenant(tt, &cfg.Server))
	}
	root.done()
	return cfg
}

func (v *validator) dir(t *table, k, def string) string {
	d := t.str(k, def, false)
	if d == "" {
		v.errorf(t.key(k), "must not be empty")
		return def
	}
	if !filepath.IsAbs(d) {
		d = filepath.Join(filepath.Dir(v.file), d)
		if abs, err := filepath.Abs(d); err == nil {
			d = abs
		}
	}
	return filepath.Clean(d)
}

func (v *validator) tenant(t *table, srv *Server) *Tenant {
	tn := &Tenant{Line: v.lines.line(t.path), Limits: srv.Limits}
	tn.Name = t.str("name", "", true)
	if _, set := t.m["name"]; set {
		if err := checkFileName("tenant name", tn.Name); err != nil {
			v.errorf(t.key("name"), "%v", err)
		}
	}
	tn.Netns = t.str("netns", tn.Name, false)
	if _, set := t.m["netns"]; set {
		tn.netnsSet = true
		if err := checkFileName("netns", tn.Netns); err != nil {
			v.errorf(t.key("netns"), "%v", err)
		}
	}
	tn.Portal = t.str("portal", DefaultPortal, false)
	if err := CheckPortal(tn.Portal); err != nil {
		v.errorf(t.key("portal"), "%v", err)
	}
	// The tenant's CHAP algorithm preference applies to every chap table that does not set
	// its own.
	var algs []chap.Algorithm
	if x, ok := t.get("chap_algorithms"); ok {
		algs = v.algorithms(t.key("chap_algorithms"), x)
	}
	if dt := t.sub("discovery_chap"); dt != nil {
		tn.DiscoveryCHAP = v.chapTable(dt, algs)
	}
	for _, tgt := range t.tables("target") {
		tn.Targets = append(tn.Targets, v.target(tgt, algs))
	}
	if lt := t.sub("limits"); lt != nil {
		tn.Limits = v.limits(lt, srv.Limits)
		v.limitsWithinServer(lt, tn.Limits, srv)
	}
	if nt := t.sub("network"); nt != nil {
		tn.Network = v.network(nt)
	}
	t.done()
	return tn
}

func (v *validator) target(t *table, algs []chap.Algorithm) *Target {
	tg := &Target{Line: v.lines.line(t.path)}
	tg.IQN = t.str("iqn", "", true)
	if _, set := t.m["iqn"]; set {
		if err := iscsiname.Check(tg.IQN); err != nil {
			v.errorf(t.key("iqn"), "%v", err)
		}
	}
	tg.Alias = t.str("alias", "", false)
	tg.Initiators = t.strings("initiators")
	seen := map[string]bool{}
	for _, in := range tg.Initiators {
		if err := iscsiname.Check(in); err != nil {
			v.errorf(t.key("initiators"), "initiator %v", err)
		} else if seen[in] {
			v.errorf(t.key("initiators"), "initiator %q listed twice", in)
		}
		seen[in] = true
	}
	if ct := t.sub("chap"); ct != nil {
		tg.CHAP = v.chapTable(ct, algs)
	}
	for i, lt := range t.tables("lun") {
		tg.LUNs = append(tg.LUNs, v.lun(lt, i))
	}
	t.done()
	return tg
}

func (v *validator) lun(t *table, position int) *LUN {
	l := &LUN{ID: uint64(position), Line: v.lines.line(t.path), sizeKey: t.key("size")}
	if x, ok := t.get("id"); ok {
		l.idSet = true
		n, ok := x.(int64)
		switch {
		case !ok:
			v.errorf(t.key("id"), "must be an integer, not %s", tomlType(x))
		case n < 0 || n > MaxLUN:
			v.errorf(t.key("id"), "LUN %d is outside 0..%d", n, MaxLUN)
		default:
			l.ID = uint64(n)
		}
	}
	l.Volume = t.str("volume", "", true)
	if _, set := t.m["volume"]; set {
		if err := backend.ValidName(l.Volume); err != nil {
			v.errorf(t.key("volume"), "%v", err)
		}
	}
	if x, ok := t.get("size"); !ok {
		v.errorf(t.path, "missing required key %q", "size")
	} else {
		var err error
		switch s := x.(type) {
		case string:
			l.Size, err = ParseSize(s)
		case int64:
			l.Size, err = checkSize(strconv.FormatInt(s, 10), s)
		default:
			err = fmt.Errorf("must be a size string like \"1GiB\" or a byte count, not %s", tomlType(x))
		}
		if err != nil {
			v.errorf(t.key("size"), "%v", err)
		}
	}
	l.ReadOnly = t.boolean("read_only", false)
	l.WriteCache = t.boolean("write_cache", true)
	t.done()
	return l
}

// crossCheck finds what no single table can see: duplicates. The line of a first use is looked
// up only for a duplicate.
func (v *validator) crossCheck(cfg *Config) {
	// value -> key of its first use
	names := make(map[string]string, len(cfg.Tenants))
	netns := make(map[string]string, len(cfg.Tenants))
	volumes := make(map[string]string, len(cfg.Tenants))
	dup := func(seen map[string]string, what, val, key string) {
		if val == "" {
			return
		}
		if f, ok := seen[val]; ok {
			v.errorf(key, "duplicate %s %q (first used at line %d, %s)", what, val, v.pos.get().line(f), f)
			return
		}
		seen[val] = key
	}
	for i, tn := range cfg.Tenants {
		tp := "tenant[" + strconv.Itoa(i) + "]"
		dup(names, "tenant name", tn.Name, tp+".name")
		nk := tp + ".netns"
		if !tn.netnsSet {
			nk = tp + ".name" // netns defaulted to the name
		}
		dup(netns, "netns", tn.Netns, nk)
		var iqns map[string]string // only two targets or more can repeat one
		if len(tn.Targets) > 1 {
			iqns = make(map[string]string, len(tn.Targets))
		}
		for j, tg := range tn.Targets {
			gp := tp + ".target[" + strconv.Itoa(j) + "]"
			// The same IQN in two tenants is two targets; twice in one tenant is ambiguous.
			if iqns != nil {
				dup(iqns, "target iqn in this tenant", tg.IQN, gp+".iqn")
			}
			var ids map[string]string
			if len(tg.LUNs) > 1 {
				ids = make(map[string]string, len(tg.LUNs))
			}
			for k, l := range tg.LUNs {
				lp := gp + ".lun[" + strconv.Itoa(k) + "]"
				if ids != nil {
					idKey := lp + ".id"
					if !l.idSet {
						idKey = lp
					}
					dup(ids, "LUN id in this target", strconv.FormatUint(l.ID, 10), idKey)
				}
				dup(volumes, "volume", l.Volume, lp+".volume")
			}
		}
	}
}
