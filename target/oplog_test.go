package target

import (
	"bytes"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"
)

// logSink collects JSON log lines for assertions.
type logSink struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (s *logSink) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.Write(p)
}

func (s *logSink) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.String()
}

// find returns the first line with msg, if any.
func (s *logSink) find(msg string) map[string]any {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, line := range strings.Split(s.buf.String(), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) == nil && m["msg"] == msg {
			return m
		}
	}
	return nil
}

func TestLoginAndLogoutOfASessionAreLoggedAtInfoWithWhoAndWhere(t *testing.T) {
	needTool(t, "iscsi-inq", "libiscsi-bin")
	sink := &logSink{}
	log := slog.New(slog.NewJSONHandler(sink, &slog.HandlerOptions{Level: slog.LevelInfo}))
	ts := startRAMServer(t, Options{Logger: log})
	// iscsi-inq logs in, asks INQUIRY and logs out.
	run(t, "iscsi-inq", "-i", "iqn.2026-01.test:ops-host", fmt.Sprintf("iscsi://%s/%s/0", ts.addr, ts.iqn))
	for _, msg := range []string{"login", "logout"} {
		l := waitLine(t, sink, msg)
		want := map[string]string{"level": "INFO", "tenant": "t1", "initiator": "iqn.2026-01.test:ops-host", "target": ts.iqn}
		for k, v := range want {
			if fmt.Sprint(l[k]) != v {
				t.Errorf("%s line: %s = %v, want %s (line %v)", msg, k, l[k], v, l)
			}
		}
		if r, _ := l["remote"].(string); !strings.HasPrefix(r, "127.0.0.1:") {
			t.Errorf("%s line: remote = %v, want the initiator's address (line %v)", msg, l["remote"], l)
		}
	}
}

func TestDiscoverySessionsAreLoggedAtDebugOnly(t *testing.T) {
	needTool(t, "iscsi-ls", "libiscsi-bin")
	sink := &logSink{}
	log := slog.New(slog.NewJSONHandler(sink, &slog.HandlerOptions{Level: slog.LevelDebug}))
	ts := startRAMServer(t, Options{Logger: log})
	run(t, "iscsi-ls", "iscsi://"+ts.addr)
	l := waitLine(t, sink, "login")
	if l["level"] != "DEBUG" || l["session"] != "discovery" {
		t.Fatalf("discovery login line %v, want level DEBUG session discovery", l)
	}
}

// waitLine waits for the first line with msg: it is written after the login response went
// out, so it may trail the tool's exit. The bound only turns a missing line into a failure.
func waitLine(t *testing.T, sink *logSink, msg string) map[string]any {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if l := sink.find(msg); l != nil {
			return l
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %q line; log:\n%s", msg, sink.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}
