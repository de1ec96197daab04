package conf

import (
	"fmt"
	"math"
	"net/netip"
	"strconv"
	"strings"
)

// maxNameLen is the longest iSCSI name in bytes (RFC 3720 3.2.6.1).
const maxNameLen = 223

// CheckISCSIName validates an iSCSI name in one of the three RFC 3720/3980 formats:
// iqn.yyyy-mm.reversed.domain[:anything], eui.<16 hex>, naa.<16 or 32 hex>.
// Names must already be in the normalized (lower case) form for iqn, because initiators
// compare them byte for byte after stringprep.
func CheckISCSIName(name string) error {
	if name == "" {
		return fmt.Errorf("empty iSCSI name")
	}
	if len(name) > maxNameLen {
		return fmt.Errorf("iSCSI name is %d bytes, the limit is %d", len(name), maxNameLen)
	}
	switch {
	case strings.HasPrefix(name, "iqn."):
		return checkIQN(name)
	case strings.HasPrefix(name, "eui."):
		if h := name[4:]; len(h) != 16 || !isHex(h) {
			return fmt.Errorf("%q: eui. must be followed by exactly 16 hex digits", name)
		}
		return nil
	case strings.HasPrefix(name, "naa."):
		if h := name[4:]; (len(h) != 16 && len(h) != 32) || !isHex(h) {
			return fmt.Errorf("%q: naa. must be followed by 16 or 32 hex digits", name)
		}
		return nil
	}
	return fmt.Errorf("%q: an iSCSI name starts with iqn., eui. or naa. (RFC 3720 3.2.6.3)", name)
}

func checkIQN(name string) error {
	rest := name[len("iqn."):]
	// yyyy-mm: the month the naming authority owned the domain.
	if len(rest) < 8 || rest[4] != '-' || rest[7] != '.' || !isDigits(rest[:4]) || !isDigits(rest[5:7]) {
		return fmt.Errorf("%q: iqn. must be followed by a date yyyy-mm and a dot", name)
	}
	if m, _ := strconv.Atoi(rest[5:7]); m < 1 || m > 12 {
		return fmt.Errorf("%q: month %s is not 01..12", name, rest[5:7])
	}
	rest = rest[8:]
	domain, _, _ := strings.Cut(rest, ":")
	if domain == "" {
		return fmt.Errorf("%q: missing reversed domain name after the date", name)
	}
	for _, label := range strings.Split(domain, ".") {
		if label == "" {
			return fmt.Errorf("%q: empty label in reversed domain name %q", name, domain)
		}
		if label[0] == '-' || label[len(label)-1] == '-' {
			return fmt.Errorf("%q: domain label %q starts or ends with '-'", name, label)
		}
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '-', c == '.', c == ':':
		case c >= 'A' && c <= 'Z':
			return fmt.Errorf("%q: iSCSI names are lower case (RFC 3722); write %q", name, strings.ToLower(name))
		default:
			return fmt.Errorf("%q: character %q is not allowed (a-z 0-9 - . :)", name, c)
		}
	}
	return nil
}

func isHex(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F') {
			return false
		}
	}
	return true
}

func isDigits(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return s != ""
}

// ParseSize reads a size: a byte count ("1048576") or a number with a unit. K, M, G, T, P
// and KiB..PiB are powers of 1024; KB..PB are powers of 1000. The result must be a positive
// multiple of 512 (the block size).
func ParseSize(s string) (int64, error) {
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
	return checkSize(s, n*mult)
}

func checkSize(orig string, n int64) (int64, error) {
	if n <= 0 {
		return 0, fmt.Errorf("size %q must be positive", orig)
	}
	if n%512 != 0 {
		return 0, fmt.Errorf("size %q (%d bytes) is not a multiple of 512", orig, n)
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

// checkFileName validates a name used as a file name (namespace under netns_dir, volume under
// data_dir): it must stay inside its directory and be easy to type.
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
