package conf

import (
	"fmt"
	"math"
	"net/netip"
	"strconv"
	"strings"
)

// ParseSize reads a size: a byte count ("1048576") or a number with a unit. K, M, G, T, P
// and KiB..PiB are powers of 1024; KB..PB are powers of 1000. The result must be a positive
// multiple of 512 (the block size).
func ParseSize(s string) (int64, error) {
	n, err := ParseBytes(s)
	if err != nil {
		return 0, err
	}
	return checkSize(s, n)
}

// ParseBytes reads an amount of memory the way ParseSize reads a volume size, without the
// block-size rule: any positive number of bytes.
func ParseBytes(s string) (int64, error) {
	t := strings.TrimSpace(s)
	i := 0
	for i < len(t) && t[i] >= '0' && t[i] <= '9' {
		i++
	}
	if i == 0 {
		return 0, fmt.Errorf("size %q: expected a number with an optional unit (e.g. 1GiB, 512MiB, 10G)", s)
	}
	if i < len(t) && t[i] == '.' {
		return 0, fmt.Errorf("size %q: fractions are not supported; use a smaller unit (e.g. 1536MiB)", s)
	}
	n, err := strconv.ParseInt(t[:i], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("size %q: %w", s, err)
	}
	unit := strings.TrimSpace(t[i:])
	mult, ok := sizeUnits[strings.ToLower(unit)]
	if !ok {
		return 0, fmt.Errorf("size %q: unknown unit %q (use B, KiB, MiB, GiB, TiB, K, M, G, T, KB, MB, GB, TB)", s, unit)
	}
	if n > math.MaxInt64/mult {
		return 0, fmt.Errorf("size %q is too large", s)
	}
	return checkPositive(s, n*mult)
}

// checkSize applies the volume rules to n bytes written as orig: positive, whole blocks.
func checkSize(orig string, n int64) (int64, error) {
	if _, err := checkPositive(orig, n); err != nil {
		return 0, err
	}
	if n%512 != 0 {
		return 0, fmt.Errorf("size %q (%d bytes) is not a multiple of 512", orig, n)
	}
	return n, nil
}

func checkPositive(orig string, n int64) (int64, error) {
	if n <= 0 {
		return 0, fmt.Errorf("size %q must be positive", orig)
	}
	return n, nil
}

var sizeUnits = map[string]int64{
	"": 1, "b": 1,
	"k": 1 << 10, "kib": 1 << 10, "kb": 1e3,
	"m": 1 << 20, "mib": 1 << 20, "mb": 1e6,
	"g": 1 << 30, "gib": 1 << 30, "gb": 1e9,
	"t": 1 << 40, "tib": 1 << 40, "tb": 1e12,
	"p": 1 << 50, "pib": 1 << 50, "pb": 1e15,
}

// CheckPortal validates an "ip:port" listen address: an IP literal (no host names, no zone) and
// a port 1..65535.
func CheckPortal(s string) error {
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return fmt.Errorf("portal %q is not ip:port (e.g. 0.0.0.0:3260, [::]:3260): %w", s, err)
	}
	if ap.Addr().Zone() != "" {
		return fmt.Errorf("portal %q: zones are not supported", s)
	}
	if ap.Port() == 0 {
		return fmt.Errorf("portal %q: port must be 1..65535", s)
	}
	return nil
}

// checkFileName validates a name that is, or may default to, a file name under netns_dir
// (tenant.netns, and tenant.name which it defaults to): it must stay inside the directory and be
// easy to type. Volume names are the pool's to judge (backend.ValidName).
func checkFileName(what, s string) error {
	if s == "" {
		return fmt.Errorf("%s must not be empty", what)
	}
	if len(s) > 200 {
		return fmt.Errorf("%s %q is longer than 200 bytes", what, s)
	}
	if s == "." || s == ".." || s[0] == '.' {
		return fmt.Errorf("%s %q must not start with '.'", what, s)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.' || c == '@' || c == '+') {
			return fmt.Errorf("%s %q: character %q is not allowed (letters, digits, - _ . @ +)", what, s, c)
		}
	}
	return nil
}
