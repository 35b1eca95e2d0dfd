// The custom role the healer's identity holds on each watched scale set: exactly the Resource
// Manager actions the handler performs (src/compute.rs REQUIRED_ACTIONS; tests/infra.rs checks
// that the two lists are the same).
targetScope = 'subscription'

param name string

resource role 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(subscription().id, name, 'vmss-healer-compute')
  properties: {
    roleName: '${name} scale set healer'
    description: 'Read scale sets and their instances; delete, reimage and restart instances; write capacity. Used by vmss-healer.'
    type: 'CustomRole'
    permissions: [
      {
        actions: [
          'Microsoft.Compute/virtualMachineScaleSets/read'
          'Microsoft.Compute/virtualMachineScaleSets/virtualMachines/read'
          'Microsoft.Compute/virtualMachineScaleSets/write'
          'Microsoft.Compute/virtualMachineScaleSets/delete/action'
          'Microsoft.Compute/virtualMachineScaleSets/reimage/action'
          'Microsoft.Compute/virtualMachineScaleSets/restart/action'
        ]
        notActions: []
      }
    ]
    assignableScopes: [subscription().id]
  }
}

output roleDefinitionId string = role.id
