package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"runtime/debug"
	"strconv"
	"sync/atomic"

	"nstarget/target"
)

// usageHandler serves GET /debug/usage: what every tenant holds (target.Server.Stats) and what
// the process holds (descriptors, resident memory, threads), so an operator or a test can see
// that a tenant's resources came back after its connections ended. With ?gc=1 it first
// collects garbage and returns free memory to the OS (as pprof's heap?gc=1 collects), so
// rss_bytes shows what is still referenced rather than what the allocator has not yet given
// back: an idle server may not collect for minutes.
type usageHandler struct {
	srv atomic.Pointer[target.Server] // set once serve has built it
}

// usageReport is the JSON of /debug/usage: {"total":…, "tenants":{…}, "process":{…}}.
type usageReport struct {
	target.Stats
	Process processUsage `json:"process"`
}

type processUsage struct {
	FDs      int   `json:"fds"`
	RSSBytes int64 `json:"rss_bytes"`
	Threads  int   `json:"threads"`
}

func (u *usageHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	srv := u.srv.Load()
	if srv == nil {
		http.Error(w, "not serving yet", http.StatusServiceUnavailable)
		return
	}
	if r.URL.Query().Get("gc") == "1" {
		debug.FreeOSMemory()
	}
	proc, err := readProcessUsage()
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(usageReport{Stats: srv.Stats(), Process: proc})
}

// readProcessUsage reads this process's descriptors, RSS and threads from /proc/self.
func readProcessUsage() (processUsage, error) {
	var p processUsage
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return p, fmt.Errorf("count descriptors: %w", err)
	}
	// The listing includes the descriptor ReadDir itself had open.
	p.FDs = len(ents) - 1
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return p, fmt.Errorf("read /proc/self/status: %w", err)
	}
	sc := bufio.NewScanner(bytes.NewReader(status))
	for sc.Scan() {
		key, val, ok := bytes.Cut(sc.Bytes(), []byte(":"))
		if !ok {
			continue
		}
		fields := bytes.Fields(val)
		if len(fields) == 0 {
			continue
		}
		n, err := strconv.ParseInt(string(fields[0]), 10, 64)
		if err != nil {
			continue
		}
		switch string(key) {
		case "VmRSS": // in kB
			p.RSSBytes = n << 10
		case "Threads":
			p.Threads = int(n)
		}
	}
	return p, nil
}
