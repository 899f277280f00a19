#!/bin/bash
# Submit every point of this ${study}-scaling sweep; job ids go to ${outdir}/jobids.txt.
set -euo pipefail
cd "$$(dirname "$$0")"
: > jobids.txt
${submissions}
echo "submitted $$(wc -l < jobids.txt) job(s): $$(tr '\n' ' ' < jobids.txt)"
