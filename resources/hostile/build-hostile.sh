#!/usr/bin/env bash
# Builds the hostile guest (hostile.c): a bare-metal ELF that moat boots as
# its kernel. Usage: build-hostile.sh OUT_DIR
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=$1
# No SSE (the boot state does not promise it), no red zone, no PIE.
gcc -O2 -ffreestanding -fno-pie -no-pie -nostdlib -static -mgeneral-regs-only \
    -mno-red-zone -fno-stack-protector -fno-asynchronous-unwind-tables \
    -Wall -Wextra -Werror -T "$here/link.ld" -Wl,--build-id=none,--no-warn-rwx-segments \
    -o "$out/hostile.elf" "$here/hostile.c"
