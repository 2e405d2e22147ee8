// emu_all.h: what every emulated program includes first (the generated emulation driver, the
// fake driver's module wrappers, the mma tests), so that it can be precompiled once: the fake
// driver (emu/fakecuda.cpp, pch_dir) and the tests (tests/emu_support.rs, compile) build
// `emu_all.h.gch` with their compile flags in a directory searched before this one; g++ uses
// it when it is valid and this text otherwise.
#pragma once

#include "cuda_emu.h"
#include "cuda_emu_mma.h"

#include <cstdio>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>
