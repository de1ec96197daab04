//go:build !linux || !rbd

package rbd

import (
	"strings"
	"testing"
)

func TestWithoutTheTagConnectSaysHowToBuildIt(t *testing.T) {
	if Compiled {
		t.Fatal("Compiled is true in the stub")
	}
	c, err := Connect(Config{Pool: "rbd"})
	if c != nil || err == nil || !strings.Contains(err.Error(), "-tags rbd") {
		t.Fatalf("Connect = %v, %v; want an error naming -tags rbd", c, err)
	}
}
