// Package iscsiname is the one validator of iSCSI names (RFC 3720 3.2.6, RFC 3980) for target
// and initiator names alike. It stands apart from the iSCSI server so that the configuration
// can apply the same rule the server does without importing the server.
package iscsiname

import (
	"fmt"
	"strconv"
	"strings"
)

// maxNameLen is the longest iSCSI name in bytes (RFC 3720 3.2.6.1).
const maxNameLen = 223

// Check validates an iSCSI name in one of the three RFC 3720/3980 formats:
// iqn.yyyy-mm.reversed.domain[:anything], eui.<16 hex>, naa.<16 or 32 hex>.
// Names must already be in the normalized (lower case) form for iqn, because initiators
// compare them byte for byte after stringprep.
func Check(name string) error {
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
