// The custom roles the healer's identity holds: on each watched scale set exactly the Resource
// Manager actions the handler performs there (src/edges/compute.rs SCALE_SET_ACTIONS), and on each
// watched resource group only the reading of asynchronous operation status (RESOURCE_GROUP_ACTIONS):
// "To track the status of an asynchronous operation, you need sufficient permission at the resource
// group level. If you only have permission at the resource level, you can start the operation but
// you can't track its status." (learn.microsoft.com, Track asynchronous Azure operations).
// tests/infra.rs checks that the lists are the same as the code's.
targetScope = 'subscription'

// A custom role's name must be unique in the whole tenant (RoleDefinitionWithSameNameExists): the
// subscription id in it keeps a deployment in another subscription of the tenant from colliding.
var suffix = '(${subscription().subscriptionId})'

param name string

@description('Whether a repair may replace instances: only a replace raises the capacity, and the one action that allows it, virtualMachineScaleSets/write, also allows changing the scale set\'s model.')
param canResize bool

// What every repair needs, on the scale set.
var instanceActions = [
  'Microsoft.Compute/virtualMachineScaleSets/read'
  'Microsoft.Compute/virtualMachineScaleSets/virtualMachines/read'
  'Microsoft.Compute/virtualMachineScaleSets/delete/action'
  'Microsoft.Compute/virtualMachineScaleSets/reimage/action'
  'Microsoft.Compute/virtualMachineScaleSets/restart/action'
  'Microsoft.Compute/virtualMachineScaleSets/start/action'
  'Microsoft.Compute/virtualMachineScaleSets/redeploy/action'
  'Microsoft.Compute/virtualMachineScaleSets/manualUpgrade/action'
]
// What a replace adds: the capacity write (Azure has no narrower action).
var resizeActions = [
  'Microsoft.Compute/virtualMachineScaleSets/write'
]

resource role 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(subscription().id, name, 'vmss-healer-compute')
  properties: {
    roleName: '${name} scale set healer ${suffix}'
    description: 'Read scale sets and their instances; delete, reimage, restart, start, redeploy and upgrade instances${canResize ? '; write capacity' : ''}. Used by vmss-healer.'
    type: 'CustomRole'
    permissions: [
      {
        actions: concat(instanceActions, canResize ? resizeActions : [])
        notActions: []
      }
    ]
    assignableScopes: [subscription().id]
  }
}

resource operationReader 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(subscription().id, name, 'vmss-healer-operations')
  properties: {
    roleName: '${name} scale set healer operation reader ${suffix}'
    description: 'Read the status of the asynchronous Compute operations the healer started. Used by vmss-healer.'
    type: 'CustomRole'
    permissions: [
      {
        actions: [
          'Microsoft.Compute/locations/operations/read'
        ]
        notActions: []
      }
    ]
    assignableScopes: [subscription().id]
  }
}

// A Flexible scale set's instances are virtual machines of its resource group, not of the scale
// set: listing them and acting on one is authorized at the group (src/edges/compute.rs
// FLEXIBLE_GROUP_ACTIONS). Granted only on the groups of Flexible sets (modules/flexible-access.bicep).
var flexibleActions = [
  'Microsoft.Compute/virtualMachines/read'
  'Microsoft.Compute/virtualMachines/restart/action'
  'Microsoft.Compute/virtualMachines/start/action'
  'Microsoft.Compute/virtualMachines/reimage/action'
  'Microsoft.Authorization/locks/read'
  'Microsoft.Compute/virtualMachines/redeploy/action'
]

resource flexibleVms 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(subscription().id, name, 'vmss-healer-flexible-vms')
  properties: {
    roleName: '${name} flexible scale set VM healer ${suffix}'
    description: 'Read virtual machines and the locks that protect them; restart, start, reimage and redeploy them: the instances of Flexible scale sets. Used by vmss-healer.'
    type: 'CustomRole'
    permissions: [
      {
        actions: flexibleActions
        notActions: []
      }
    ]
    assignableScopes: [subscription().id]
  }
}

// A blue/green swap (`handler swap`) moves autoscale settings, which are resources of a resource
// group: read, written (a setting for the new set, the old one disabled) and, on a rollback,
// deleted (src/edges/compute.rs AUTOSCALE_ACTIONS). Granted only with enableSwap.
var autoscaleActions = [
  'Microsoft.Insights/autoscalesettings/read'
  'Microsoft.Insights/autoscalesettings/write'
  'Microsoft.Insights/autoscalesettings/delete'
]

resource autoscaleMover 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(subscription().id, name, 'vmss-healer-autoscale')
  properties: {
    roleName: '${name} scale set swap autoscale mover ${suffix}'
    description: 'Read, write and delete autoscale settings: a blue/green swap moves the old scale set\'s setting to the new one. Used by vmss-healer.'
    type: 'CustomRole'
    permissions: [
      {
        actions: autoscaleActions
        notActions: []
      }
    ]
    assignableScopes: [subscription().id]
  }
}

// A golden image (`handler prototype`): the instance prepared by Run Command and deallocated, its
// OS disk snapshotted, the gallery, image definition and versions (src/edges/compute/mod.rs
// PROTOTYPE_ACTIONS). Granted on the watched groups only with enablePrototype.
var prototypeActions = [
  'Microsoft.Compute/virtualMachineScaleSets/virtualMachines/runCommand/action'
  'Microsoft.Compute/virtualMachineScaleSets/virtualMachines/deallocate/action'
  'Microsoft.Compute/disks/read'
  'Microsoft.Compute/snapshots/write'
  'Microsoft.Compute/snapshots/delete'
  'Microsoft.Compute/galleries/read'
  'Microsoft.Compute/galleries/write'
  'Microsoft.Compute/galleries/images/read'
  'Microsoft.Compute/galleries/images/write'
  'Microsoft.Compute/galleries/images/versions/read'
  'Microsoft.Compute/galleries/images/versions/write'
  'Microsoft.Compute/galleries/images/versions/delete'
]

resource imageMaker 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(subscription().id, name, 'vmss-healer-prototype')
  properties: {
    roleName: '${name} scale set golden image maker ${suffix}'
    description: 'Prepare and deallocate a scale set instance, snapshot its OS disk, and publish it as a gallery image version: handler prototype. Used by vmss-healer.'
    type: 'CustomRole'
    permissions: [
      {
        actions: prototypeActions
        notActions: []
      }
    ]
    assignableScopes: [subscription().id]
  }
}

// A stateful replacement (issue 18): the slot's data disks detached from the broken instance and
// attached to the new one, a disk moved into another zone by snapshot and copy, a Flexible VM's
// address moved by writing the NICs (src/edges/compute/mod.rs STATEFUL_ACTIONS). Granted on the
// groups of the stateful sets only (a virtual network in another group needs its subnets/join
// there).
var statefulActions = [
  'Microsoft.Compute/virtualMachineScaleSets/virtualMachines/attachDetachDataDisks/action'
  'Microsoft.Compute/virtualMachines/attachDetachDataDisks/action'
  'Microsoft.Compute/disks/read'
  'Microsoft.Compute/disks/write'
  'Microsoft.Compute/disks/delete'
  'Microsoft.Compute/snapshots/write'
  'Microsoft.Compute/snapshots/delete'
  'Microsoft.Network/networkInterfaces/read'
  'Microsoft.Network/networkInterfaces/write'
  'Microsoft.Network/virtualNetworks/subnets/join/action'
  'Microsoft.Network/publicIPAddresses/join/action'
]

resource diskMover 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(subscription().id, name, 'vmss-healer-stateful')
  properties: {
    roleName: '${name} stateful instance disk mover ${suffix}'
    description: 'Detach a stateful scale set instance\'s data disks and attach them to its replacement, copying a disk into another zone by snapshot: the stateful replacement. Used by vmss-healer.'
    type: 'CustomRole'
    permissions: [
      {
        actions: statefulActions
        notActions: []
      }
    ]
    assignableScopes: [subscription().id]
  }
}

output roleDefinitionId string = role.id
output statefulRoleId string = diskMover.id
output prototypeRoleId string = imageMaker.id
output autoscaleRoleId string = autoscaleMover.id
output flexibleVmRoleId string = flexibleVms.id
output operationReaderRoleId string = operationReader.id
