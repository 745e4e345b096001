// The launch interface of the block scheduler (fiber.cpp) for the driver (driver.cpp).
#pragma once
#include <string>

#include "emu.h"

namespace emu {

struct KernelEntry {
    const char* name;
    void* fn;
    Thunk thunk;
};

// The kernel registered under `name` (build.rs registers every kernel of cuda/*.cu).
const KernelEntry* find_kernel(const char* name);

// Runs the kernel over the grid; empty on success, else a description of the failure.
std::string launch(const KernelEntry& k, dim3 grid, dim3 block, void** args);

// For the fault handler: describes where `a` lies relative to the live allocation whose guard
// pages or slack hold it (driver.cpp); false if no allocation's mapping holds it.
bool describe_address(uintptr_t a, char* buf, size_t len);

}  // namespace emu
