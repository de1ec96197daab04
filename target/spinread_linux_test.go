package target

import (
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

func tcpPair(t *testing.T) (server, client net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server, err = ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { server.Close(); client.Close() })
	return server, client
}

// The spinning reader must deliver exactly what the peer wrote, whether the bytes are already
// there, arrive while it spins, or arrive after it parked; then EOF when the peer closes.
func TestSpinReaderDeliversBytesThenEOF(t *testing.T) {
	server, client := tcpPair(t)
	r := newSocketReader(server, nil, nil)
	sr, ok := r.(*spinReader)
	if !ok {
		t.Fatalf("TCP conn got %T, want *spinReader", r)
	}
	sr.enableSpin()
	go func() {
		client.Write([]byte("now"))
		time.Sleep(20 * time.Microsecond) // within the spin
		client.Write([]byte("-spin"))
		time.Sleep(50 * time.Millisecond) // long after it: parked on the poller
		client.Write([]byte("-parked"))
		client.Close()
	}()
	got, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != "now-spin-parked" {
		t.Fatalf("read %q", got)
	}
}

// A read deadline must still end a parked spinning read.
func TestSpinReaderHonoursReadDeadline(t *testing.T) {
	server, _ := tcpPair(t)
	r := newSocketReader(server, nil, nil)
	r.(*spinReader).enableSpin()
	server.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	_, err := r.Read(make([]byte, 10))
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("err %v, want a timeout", err)
	}
}

// The QD1 hot path reads through it once per command: no allocation per read.
func TestSpinReaderReadDoesNotAllocate(t *testing.T) {
	server, client := tcpPair(t)
	r := newSocketReader(server, nil, nil)
	r.(*spinReader).enableSpin()
	msg := []byte("0123456789abcdef")
	buf := make([]byte, len(msg))
	allocs := testing.AllocsPerRun(200, func() {
		if _, err := client.Write(msg); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(r, buf); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("%.1f allocations per write+read, want 0", allocs)
	}
}
