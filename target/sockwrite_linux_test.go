package target

import (
	"bytes"
	"io"
	"math/rand"
	"testing"
	"time"
)

// The raw writer must put every byte of a batch on the wire in order: batches longer than
// IOV_MAX, buffers split by partial writes, and a socket that fills up (the writer parks until
// the slow peer reads) included; a closed connection ends a parked write with an error.
func TestSockWriterWritesEverythingInOrder(t *testing.T) {
	server, client := tcpPair(t)
	w := newSockWriter(server)
	if !rawSocketCalls {
		if w != nil {
			t.Fatal("race build: want the net package's write path (nil writer)")
		}
		t.Skip("race build: writes take net.Buffers.WriteTo")
	}
	if w == nil {
		t.Fatal("TCP conn got no raw writer")
	}
	rng := rand.New(rand.NewSource(1))
	var bufs [][]byte
	var want []byte
	for len(want) < 8<<20 || len(bufs) < 2*maxIOV {
		b := make([]byte, rng.Intn(16<<10))
		if rng.Intn(8) == 0 {
			b = b[:min(len(b), rng.Intn(48))] // BHS-sized pieces, and empty ones
		}
		rng.Read(b)
		bufs = append(bufs, b)
		want = append(want, b...)
	}
	got := make(chan []byte, 1)
	go func() {
		var out bytes.Buffer
		chunk := make([]byte, 100<<10)
		for out.Len() < len(want) {
			n, err := client.Read(chunk)
			out.Write(chunk[:n])
			if err != nil {
				break
			}
			if out.Len() < 2<<20 {
				time.Sleep(time.Millisecond) // slow at first: the socket fills, the writer parks
			}
		}
		got <- out.Bytes()
	}()
	if err := w.writeBuffers(bufs); err != nil {
		t.Fatal(err)
	}
	if g := <-got; !bytes.Equal(g, want) {
		t.Fatalf("peer read %d bytes, not the %d written in order", len(g), len(want))
	}
	for _, v := range w.iov[:cap(w.iov)] {
		if v.Base != nil {
			t.Fatal("writer keeps a pointer to a written buffer")
		}
	}

	// A write parked on a full socket ends when the connection is closed.
	big := [][]byte{make([]byte, 64<<20)}
	done := make(chan error, 1)
	go func() { done <- w.writeBuffers(big) }()
	time.Sleep(10 * time.Millisecond)
	server.Close()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("write to a closed connection succeeded")
		}
	case <-time.After(20 * time.Second):
		t.Fatal("parked write did not end when the connection closed")
	}
	client.Close()
	io.Copy(io.Discard, client)
}

// A write allocates nothing (the data path's rule).
func TestSockWriterAllocatesNothing(t *testing.T) {
	server, client := tcpPair(t)
	w := newSockWriter(server)
	if w == nil {
		t.Skip("no raw writer in this build")
	}
	go io.Copy(io.Discard, client)
	bufs := [][]byte{make([]byte, 48), make([]byte, 4096), make([]byte, 48)}
	if n := testing.AllocsPerRun(200, func() {
		if err := w.writeBuffers(bufs); err != nil {
			t.Error(err)
		}
	}); n != 0 {
		t.Fatalf("writeBuffers allocates %v times per call", n)
	}
}
